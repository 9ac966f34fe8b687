"""What a fit needs to be resumed where it stopped: a checkpoint on SIGTERM, and a mark once it finished.

The CLI adds this callback to every run (``--resume.*`` in the config) and, before a ``fit``, looks
for the run's own unfinished checkpoint (``lightning_modules.resume``): a ``last.ckpt`` with no
``fit_finished.json`` beside it. So:

- kill -9, a lost machine: the rerun continues from the last periodic ``last.ckpt``;
- SIGTERM (a scheduler, Kubernetes, ``kill``): Lightning turns it into ``SIGTERMException`` at the
  next step boundary; ``on_exception`` saves ``last.ckpt`` at that step, and the CLI exits with 143;
- a fit that ends normally writes ``fit_finished.json``, so running it again starts a new run
  instead of "resuming" a finished one;
- while a fit runs, ``fit_running.json`` names its host, process, process start time and boot id
  (``running_mark``), so a second copy of the same command on that machine (a double launch, an
  orphaned stage) is refused instead of training into the same folder at the same time, while a
  reused pid after a reboot or container restart is not mistaken for it;
- every checkpoint stores the run folder that wrote it (this callback's state), so resume never takes
  another run's checkpoint from a shared ``dirpath``; and every rank checks the checkpoint for NaN/inf
  before it is written: one bad tensor on any rank (a shard) stops the fit on every rank, naming it.

The marks are written atomically (``instaflow.state``): a kill leaves the old mark or the new one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.ema import find_ema
from instaflow.collective import every_rank_raises
from instaflow.models.checkpoints import FINISHED, RUN_STATE_KEY, RUNNING, refuse_non_finite, running_mark
from instaflow.state import atomic_write_json


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

    @property
    def state_key(self) -> str:
        return RUN_STATE_KEY  # lightning_modules.resume reads it back under this name

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._run = str(Path(trainer.log_dir or trainer.default_root_dir).resolve())

    def state_dict(self) -> dict[str, Any]:
        return {"run": self._run}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # every rank, before any writes: a rank-0-only refusal would leave the others waiting in the next collective
        with every_rank_raises(f"checking the checkpoint of step {trainer.global_step} for NaN/inf"):
            refuse_non_finite(checkpoint, "checked before saving")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # started or resumed: unfinished until on_fit_end says otherwise
        if trainer.is_global_zero:
            for d in last_checkpoint_dirs(trainer):
                (d / FINISHED).unlink(missing_ok=True)
                atomic_write_json(d / RUNNING, {**running_mark(), "time": time.time()})

    def _not_running(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            for d in last_checkpoint_dirs(trainer):
                (d / RUNNING).unlink(missing_ok=True)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._not_running(trainer)
        # a dataloader worker killed by the same SIGTERM surfaces as a RuntimeError: still a stop between steps
        if not (isinstance(exception, SIGTERMException) or trainer.received_sigterm):
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
            for d in last_checkpoint_dirs(trainer):
                atomic_write_json(d / FINISHED, {"step": trainer.global_step, "time": time.time()})
