"""Export the trained model (EMA weights when an EMA callback is present) when fitting ends."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback

from callbacks.ema import find_ema


class Export(Callback):
    """Call ``pl_module.export(dirpath)`` at the end of ``fit``, on rank zero, inside the EMA swap."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ema = find_ema(trainer)
        if ema is not None:
            with ema.swapped(pl_module):
                self._export(trainer, pl_module)
        else:
            self._export(trainer, pl_module)

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            path = pl_module.export(self.dirpath)
            print(f"exported to {path}")
        trainer.strategy.barrier()
