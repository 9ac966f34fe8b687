"""Export the trained model (EMA weights when an EMA callback is present) when fitting ends."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback

from callbacks.ema import find_ema
from instaflow.contracts import Exportable, GathersForExport


class Export(Callback):
    """Call ``pl_module.export(dirpath)`` at the end of ``fit``, on rank zero, inside the EMA swap.

    The module is ``contracts.Exportable``; one that is ``contracts.GathersForExport``
    (``FlowStudent``) first gathers its weights on every rank, so an FSDP2-sharded UNet is exported whole.

    Without ``dirpath`` the module's ``export_dir`` hyperparameter is used, so an experiment that
    overrides another changes one model key instead of the whole callback list.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, Exportable):
            raise TypeError(f"Export needs a module with export(dirpath) (contracts.Exportable); "
                            f"{type(pl_module).__name__} has none")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ema = find_ema(trainer)
        if ema is not None:
            with ema.swapped(pl_module):
                self._export(trainer, pl_module)
        else:
            self._export(trainer, pl_module)

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dirpath = self.dirpath or getattr(pl_module.hparams, "export_dir", None)
        if not dirpath:
            raise ValueError("Export needs a dirpath, or a module with an export_dir hyperparameter")
        # a sharded (FSDP2) module gathers its full weights first: a collective, so every rank calls it
        unet = pl_module.export_unet() if isinstance(pl_module, GathersForExport) else None
        if trainer.is_global_zero:
            path = pl_module.export(dirpath) if unet is None else pl_module.export(dirpath, unet=unet)
            print(f"exported to {path}")
        trainer.strategy.barrier()
