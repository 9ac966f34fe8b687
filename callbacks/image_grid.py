"""Image grids of fixed prompts and seeds, written to TensorBoard and as PNGs in the run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import lightning as L
from lightning.pytorch.callbacks import Callback

from instaflow.collective import on_rank_zero
from instaflow.contracts import SamplesGrid
from instaflow.evaluation.grids import captioned_grid, save_png


@runtime_checkable
class TakesImages(Protocol):
    """A logger's experiment that shows images (TensorBoard's ``SummaryWriter``); other loggers get the PNGs only."""

    def add_image(self, tag: str, img_tensor, global_step: int | None = None) -> None:
        ...


class ImageGrid(Callback):
    """After each validation, ask the module for ``sample_grid(prompts, seed)`` (``contracts.SamplesGrid``)
    and log every grid.

    ``sample_grid`` returns ``{name: (N, 3, H, W) in [0, 1]}`` (e.g. one-step beside multi-step),
    one image per prompt, from the same seeds every time so grids are comparable across steps. Every
    image carries its prompt and the grid's setting (e.g. ``euler1_w1``) under it, in TensorBoard
    (``samples/<name>``) and in the PNGs (``<log_dir>/grids/<name>_<step>.png``), upscaled ``png_scale`` times.
    """

    def __init__(self, prompts: list[str], seed: int = 0, nrow: int = 8, png_scale: int = 4) -> None:
        self.prompts = prompts
        self.seed = seed
        self.nrow = nrow
        self.png_scale = png_scale

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, SamplesGrid):
            raise TypeError(f"ImageGrid needs a module with sample_grid(prompts, seed) (contracts.SamplesGrid); "
                            f"{type(pl_module).__name__} has none: drop the callback or implement it")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        grids = pl_module.sample_grid(self.prompts, seed=self.seed)
        # trainer.log_dir broadcasts from rank 0: read it on every rank, or rank 0 waits forever
        log_dir = trainer.log_dir
        # rank 0 writes alone; an error there (a full disk) is raised on every rank, not left as a hang
        on_rank_zero(trainer.strategy, lambda: self._log(trainer, grids, log_dir), "ImageGrid: writing the grids")

    def _log(self, trainer: L.Trainer, grids: dict, log_dir: str | None) -> None:
        for name, images in grids.items():
            # modules without prompts (e.g. a VAE's reconstructions) label each image by its index
            prompts = self.prompts if len(self.prompts) >= len(images) else [f"#{i}" for i in range(len(images))]
            captions = [f"{p} [{name}, seed {self.seed + i}]" for i, p in enumerate(prompts[:len(images)])]
            grid = captioned_grid(images, captions, self.nrow, scale=self.png_scale)
            for logger in trainer.loggers:
                exp = getattr(logger, "experiment", None)  # a Logger's own attribute, not the module's
                if isinstance(exp, TakesImages):
                    exp.add_image(f"samples/{name}", grid, trainer.global_step)
            if log_dir:
                save_png(grid, Path(log_dir) / "grids" / f"{name}_{trainer.global_step:06d}.png")
