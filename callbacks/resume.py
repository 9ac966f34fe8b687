"""What a fit needs to be resumed where it stopped: a checkpoint on SIGTERM, and a mark once it finished.

The CLI adds this callback to every run (``--resume.*`` in the config) and, before a ``fit``, looks
for the run's own unfinished checkpoint (``lightning_modules.resume``): a ``last.ckpt`` with no
``fit_finished.json`` beside it. So:

- kill -9, a lost machine: the rerun continues from the last periodic ``last.ckpt``;
- SIGTERM (a scheduler, Kubernetes, ``kill``): Lightning turns it into ``SIGTERMException`` at the
  next step boundary; ``on_exception`` saves ``last.ckpt`` at that step, and the CLI exits with 143;
- a fit that ends normally writes ``fit_finished.json``, so running it again starts a new run
  instead of "resuming" a finished one;
- while a fit runs, ``fit_running.json`` names its host and process, so a second copy of the same
  command on that machine (a double launch, an orphaned stage) is refused instead of training into
  the same folder at the same time.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.ema import find_ema
from instaflow.models.checkpoints import FINISHED, RUNNING


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

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # started or resumed: unfinished until on_fit_end says otherwise
        if trainer.is_global_zero:
            for d in last_checkpoint_dirs(trainer):
                (d / FINISHED).unlink(missing_ok=True)
                d.mkdir(parents=True, exist_ok=True)
                (d / RUNNING).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                     "start": time.time()}) + "\n")

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
            if trainer.is_global_zero and path.is_symlink():  # save_last="link": replace the link, not its target
                path.unlink()
            trainer.save_checkpoint(str(path))  # every rank: a collective under sharded strategies
            if trainer.is_global_zero:
                print(f"[resume] SIGTERM: saved step {trainer.global_step} to {path}; rerun the same command to "
                      "continue from it", flush=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._not_running(trainer)
        if trainer.is_global_zero:
            for d in last_checkpoint_dirs(trainer):
                d.mkdir(parents=True, exist_ok=True)
                (d / FINISHED).write_text(json.dumps({"step": trainer.global_step, "time": time.time()}) + "\n")
