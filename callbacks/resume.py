"""The Lightning side of the resume protocol (``instaflow.resume``): marks, the run's state, the SIGTERM checkpoint.

The CLI adds this callback to every run (``--resume.*`` in the config) and, before a ``fit``, looks
for the run's own unfinished checkpoint (``instaflow.resume.find``). This callback only says when:

- ``on_fit_start``: the fit is running (``fit_running.json``, ``marks.mark_running``), unfinished;
- ``on_save_checkpoint``: every rank refuses a checkpoint holding NaN/inf before any rank writes;
  each checkpoint stores this run's folder (this callback's state, ``marks.run_state``);
- ``on_train_batch_end``: whether any rank has received SIGTERM (a scheduler, Kubernetes, ``kill``) is
  decided by all ranks together (one all-reduce of a flag per step); if one has, every rank raises
  ``SIGTERMException`` after the same step. Lightning's own handler decides per rank, and the signal
  reaches the ranks microseconds apart: a rank that saw it one step later than the others was in that
  step's gradient all-reduce while they were in the checkpoint's collectives (the rehearsal's 4-rank
  SIGTERM job failed so, 2 runs of 3, with "connection reset by peer"). This callback's handler replaces
  Lightning's for the fit (Lightning restores the original at teardown);
- ``on_exception``: after that stop ``last.ckpt`` is saved at the agreed step and the CLI exits with 143;
  a kill -9 or a lost machine resumes from the last periodic ``last.ckpt``;
- ``on_fit_end``: ``fit_finished.json``, so running the command again starts a new run.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.ema import find_ema
from instaflow.resume.marks import RUN_STATE_KEY, clear_running, mark_finished, mark_running, run_state
from instaflow.resume.refusals import refuse_non_finite_on_every_rank


def last_checkpoint_dirs(trainer: L.Trainer) -> list[Path]:
    """The folders where this run's ``ModelCheckpoint(save_last=...)`` callbacks keep ``last.ckpt``."""
    dirs = []
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath and Path(cb.dirpath) not in dirs:
            dirs.append(Path(cb.dirpath))
    return dirs


class Resume(Callback):
    """Saves ``last.ckpt`` when the fit is stopped by SIGTERM; marks a finished fit (``fit_finished.json``).

    Args:
        auto: before a ``fit``, continue from the run's own unfinished checkpoint when there is one
            (read by the CLI; ``--resume.auto false`` always starts afresh; an explicit
            ``--ckpt_path`` wins over both).
    """

    def __init__(self, auto: bool = True) -> None:
        self.auto = auto
        self._run: str | None = None
        self._sigterm = False  # set by this rank's handler; acted on when the ranks agree

    @property
    def state_key(self) -> str:
        return RUN_STATE_KEY  # instaflow.resume.find reads it back under this name

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._run = str(Path(trainer.log_dir or trainer.default_root_dir).resolve())

    def state_dict(self) -> dict[str, Any]:
        return run_state(self._run)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        refuse_non_finite_on_every_rank(checkpoint, "checked before saving",
                                        f"checking the checkpoint of step {trainer.global_step} for NaN/inf")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # started or resumed: unfinished until on_fit_end says otherwise
        if trainer.is_global_zero:
            mark_running(last_checkpoint_dirs(trainer))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sigterm = False
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            signal.signal(signal.SIGTERM, self._on_sigterm)  # replaces Lightning's per-rank decision

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._sigterm = True  # only a flag: the stop happens between steps, on every rank at once

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # every rank calls this once per batch, so the all-reduce pairs up; any rank's signal stops all of them
        if trainer.strategy.reduce_boolean_decision(self._sigterm, all=False):
            self._sigterm = True
            raise SIGTERMException()

    def _not_running(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            clear_running(last_checkpoint_dirs(trainer))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._not_running(trainer)
        # a dataloader worker killed by the same SIGTERM surfaces as a RuntimeError: still a stop between steps
        if not (isinstance(exception, SIGTERMException) or self._sigterm or trainer.received_sigterm):
            return
        ema = find_ema(trainer)
        if ema is not None:
            ema.restore_training_weights()  # stopped inside validation: save the training weights, not the EMA's
        for d in last_checkpoint_dirs(trainer):
            path = d / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
            if trainer.is_global_zero and path.is_symlink() and type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
                path.unlink()  # save_last="link" under Lightning's IO, which writes through a link into its target
            trainer.save_checkpoint(str(path))  # every rank: a collective under sharded strategies
            if trainer.is_global_zero:
                print(f"[resume] SIGTERM: saved step {trainer.global_step} to {path}; rerun the same command to "
                      "continue from it", flush=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._not_running(trainer)
        if trainer.is_global_zero:
            mark_finished(last_checkpoint_dirs(trainer), trainer.global_step)
