"""Faults the rehearsal injects into a real 4-rank fit, as callbacks named in the run's YAML
(``tests.rehearsal.faults.<Class>``): each fires once, on one rank, at one step, and leaves a file saying when.

NaN gradients use ``tests.lightning_modules.test_nonfinite.InjectNaN``; a kill inside a checkpoint write arms
``tests.lightning_modules.test_checkpoint_safety._arm_kill_in_last_ckpt_write`` (the same mechanisms as the
one-process tests, here on 4 ranks).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning as L


def _once(path: str | Path) -> bool:
    """True the first time (creates ``path``, with the time), False when a former attempt already fired."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, f"{time.time()}\n".encode())
    os.close(fd)
    return True


class RaiseInValidation(L.Callback):
    """Rank ``rank`` raises ``RuntimeError(message)`` in its first validation batch of the fit, once."""

    def __init__(self, message: str, once: str, rank: int = 0) -> None:
        self.message, self.once, self.rank = message, once, rank

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.global_rank == self.rank and not trainer.sanity_checking and _once(self.once):
            raise RuntimeError(self.message)


class KillWhileWritingOn(L.Callback):
    """After optimizer step ``step``, rank ``rank`` (the one that writes: rank 0 under DDP) is SIGKILLed inside the
    write of ``last.ckpt`` (the periodic ``step=<step>.ckpt`` is written whole first), once."""

    def __init__(self, step: int, once: str, rank: int = 0) -> None:
        self.step, self.once, self.rank = step, once, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank and _once(self.once):
            from tests.lightning_modules.test_checkpoint_safety import _arm_kill_in_last_ckpt_write

            _arm_kill_in_last_ckpt_write()


class KillRankAt(L.Callback):
    """Rank ``rank`` sends itself ``signum`` after optimizer step ``step``, once (a node that died)."""

    def __init__(self, step: int, once: str, signum: int = int(signal.SIGKILL), rank: int = 0) -> None:
        self.step, self.once, self.signum, self.rank = step, once, signum, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank and _once(self.once):
            os.kill(os.getpid(), self.signum)


class TermJobAt(L.Callback):
    """After optimizer step ``step``, rank 0 sends SIGTERM to the job's process group (the one torchrun, its parent,
    runs in), as a scheduler preempting the job does; once. torchrun starts each worker in a session of its own:
    the workers get the signal from torchrun, which passes it on."""

    def __init__(self, step: int, once: str) -> None:
        self.step, self.once = step, once

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == 0 and _once(self.once):
            os.killpg(os.getpgid(os.getppid()), signal.SIGTERM)


class DeleteShardAt(L.Callback):
    """After optimizer step ``step``, rank ``rank`` deletes ``shard`` from the shared folder (storage that lost a
    file mid-epoch), once."""

    def __init__(self, step: int, shard: str, once: str, rank: int = 1) -> None:
        self.step, self.shard, self.once, self.rank = step, shard, once, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank and _once(self.once):
            Path(self.shard).unlink()
