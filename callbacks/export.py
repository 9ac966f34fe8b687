"""Export the trained model (EMA weights when an EMA callback is present) when fitting ends: the last
weights, or those of the best checkpoint by a monitored score."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from callbacks.ema import find_ema
from instaflow.collective import on_rank_zero
from instaflow.contracts import Exportable, ExportsFromState, GathersForExport
from instaflow.resume.checkpoints import checkpoint_weights
from instaflow.state import atomic_folder


class Export(Callback):
    """Call ``pl_module.export(dirpath)`` at the end of ``fit``, on rank zero, inside the EMA swap.

    The module is ``contracts.Exportable``; one that is ``contracts.GathersForExport``
    (``FlowStudent``) first gathers its weights on every rank, so an FSDP2-sharded UNet is exported whole.

    Without ``dirpath`` the module's ``export_dir`` hyperparameter is used, so an experiment that
    overrides another changes one model key instead of the whole callback list.

    ``weights: best`` exports the best checkpoint of the run's ``ModelCheckpoint`` that has a
    ``monitor`` (e.g. ``quality/fid_euler1_w1`` logged by ``callbacks.quality.Quality``), with the
    EMA weights stored in it when an EMA callback is present, instead of the weights training ended
    with (scores can regress with longer training). Any strategy: a checkpoint file, or a sharded
    FSDP2 checkpoint folder (the EMA's whole tensors are in its metadata; the raw weights are
    converted from the shards on rank 0).

    Safe at scale: the folder is written beside ``dirpath`` and renamed into place when complete
    (``instaflow.state.atomic_folder``; a previous export stays until then), so a kill or an error
    half way never leaves a folder whose ``model_index.json`` says "done"; and the rank-0 writing runs
    through ``instaflow.collective.on_rank_zero``, so its error is raised on every rank at once.
    """

    def __init__(self, dirpath: str | None = None, weights: str = "last") -> None:
        if weights not in ("last", "best"):
            raise ValueError(f"Export weights must be last or best, got {weights!r}")
        self.dirpath, self.weights = dirpath, weights

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, Exportable):
            raise TypeError(f"Export needs a module with export(dirpath) (contracts.Exportable); "
                            f"{type(pl_module).__name__} has none")
        if self.weights == "best":
            if not isinstance(pl_module, GathersForExport) or not isinstance(pl_module, ExportsFromState):
                raise TypeError(f"Export(weights=best) needs a module that rebuilds its network from a state dict "
                                f"(contracts.ExportsFromState: unet_from_state, as FlowStudent); "
                                f"{type(pl_module).__name__} has none")
            self._monitored(trainer)

    @staticmethod
    def _monitored(trainer: L.Trainer) -> ModelCheckpoint:
        found = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor]
        if not found:
            raise ValueError("Export(weights=best) needs a ModelCheckpoint with a monitor in trainer.callbacks (e.g. "
                             "monitor: quality/fid_euler1_w1, mode: min, save_top_k: 2, beside the Quality callback)")
        return found[0]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.weights == "best":
            self._export_best(trainer, pl_module)
            return
        ema = find_ema(trainer)
        if ema is not None:
            with ema.swapped(pl_module):
                self._export(trainer, pl_module)
        else:
            self._export(trainer, pl_module)

    def _dirpath(self, pl_module: L.LightningModule) -> str:
        dirpath = self.dirpath or getattr(pl_module.hparams, "export_dir", None)
        if not dirpath:
            raise ValueError("Export needs a dirpath, or a module with an export_dir hyperparameter")
        return dirpath

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dirpath = self._dirpath(pl_module)
        # a sharded (FSDP2) module gathers its full weights first: a collective, so every rank calls it
        unet = pl_module.export_unet() if isinstance(pl_module, GathersForExport) else None
        path = on_rank_zero(trainer.strategy, lambda: write_export(pl_module, dirpath, unet),
                            f"Export: writing {dirpath}")
        if trainer.is_global_zero:
            print(f"exported to {path}")

    def _export_best(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ckpt = self._monitored(trainer)
        path = trainer.strategy.broadcast(ckpt.best_model_path)
        if not path:
            raise RuntimeError(f"Export(weights=best): ModelCheckpoint(monitor={ckpt.monitor!r}) saved no checkpoint "
                               "(was the monitored score ever logged before a save?)")
        dirpath = self._dirpath(pl_module)
        out = on_rank_zero(trainer.strategy, lambda: self._write_best(trainer, pl_module, path, dirpath),
                           f"Export(weights=best): exporting {path} to {dirpath}")
        if trainer.is_global_zero:
            print(f"exported the best checkpoint ({ckpt.monitor} = {float(ckpt.best_model_score):.4g}, {path}) to {out}")

    @staticmethod
    def _write_best(trainer: L.Trainer, pl_module: L.LightningModule, path: str, dirpath: str) -> str:
        """Rank 0: the checkpoint's (EMA) weights into a whole network, written as the export."""
        ema = find_ema(trainer)
        state = checkpoint_weights(path, prefix=getattr(ema, "attr", "unet") + ".",
                                   ema_key=ema.state_key if ema is not None else None,
                                   names=pl_module.trainable_names() if ema is not None else None)
        return write_export(pl_module, dirpath, pl_module.unet_from_state(state))


def write_export(pl_module: L.LightningModule, dirpath: str, unet=None) -> str:
    """``pl_module.export`` into a folder beside ``dirpath``, renamed into place only when complete; returns ``dirpath``.

    The previous export stays in place until the new one is whole, and nothing inside records the
    temporary name (the modules' exports write no absolute paths).
    """
    with atomic_folder(dirpath) as tmp:
        out = pl_module.export(str(tmp)) if unet is None else pl_module.export(str(tmp), unet=unet)
        keep_the_rest(Path(dirpath), tmp, Path(out), type(pl_module).__name__)
    return str(dirpath)


def keep_the_rest(dirpath: Path, tmp: Path, out: Path, who: str) -> None:
    """A module that writes one part of the folder (the VAE trainer's ``vae/`` beside a teacher's UNet) keeps the
    folder's other entries: they are carried into the new folder as hard links (no copy of the data)."""
    try:
        rel = out.resolve().relative_to(tmp.resolve())
    except ValueError:
        raise RuntimeError(f"{who}.export wrote {out}, outside the folder it was given ({tmp})") from None
    if rel == Path(".") or not dirpath.is_dir():
        return
    for entry in dirpath.iterdir():
        if entry.name == rel.parts[0] or (tmp / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, tmp / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, tmp / entry.name)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    """A hard link where the filesystem allows one, else a copy; a symlink stays a symlink."""
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
