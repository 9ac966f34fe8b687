"""Train the embedded evaluator (``instaflow.evaluation.shapes_evaluator.ShapesEvaluator``): the
shapes world's stand-in for Inception features (FID) and CLIP (prompt alignment)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from instaflow.evaluation.shapes_evaluator import (HEADS, IGNORE, ShapesEvaluator, attribute_accuracies, augment,
                                                   batch_targets, logits_to_scenes, save_evaluator)
from instaflow.flow.losses import check_nonfinite_setting
from instaflow.flow.schedules import adamw_with_warmup, check_optimizer_settings
from lightning_modules.nonfinite import DEFAULT_LIMIT, NonfiniteGuard


class EvaluatorTraining(NonfiniteGuard, L.LightningModule):
    """Cross-entropy on every head (shape/colour/size on occupied cells only), with light augmentation.

    Logs ``train/loss`` (and per head), ``val/loss``, ``val/acc_*`` (see ``attribute_accuracies``)
    and ``val/alignment``: the exact-match rate on the real, unaugmented validation images. A step with a
    non-finite loss or gradient is skipped and counted, or stops the run (``nonfinite``, ``nonfinite_limit``:
    ``lightning_modules.nonfinite.NonfiniteGuard``).
    """

    def __init__(self, width: int = 32, feature_dim: int = 128, norm: str = "group", lr: float = 3e-3,
                 weight_decay: float = 1e-4, warmup_steps: int = 100, augment: dict | None = None,
                 seed: int = 0, nonfinite: str = "skip", nonfinite_limit: int = DEFAULT_LIMIT) -> None:
        super().__init__()
        check_optimizer_settings(lr, warmup_steps, weight_decay)
        check_nonfinite_setting(nonfinite, nonfinite_limit)
        self.save_hyperparameters()
        self.model = ShapesEvaluator(width, feature_dim, norm)
        self.augment_kwargs = dict(augment or {})
        self._gen: torch.Generator | None = None
        self._val_preds: list[dict] = []
        self._val_scenes: list[dict] = []
        self.val_metrics: dict[str, float] = {}

    def _losses(self, logits: dict, targets: dict) -> dict[str, torch.Tensor]:
        parts = {k: F.cross_entropy(logits[k].flatten(0, 1), targets[k].flatten(), ignore_index=IGNORE)
                 for k, _ in HEADS}
        parts["background"] = F.cross_entropy(logits["background"], targets["background"])
        parts["loss"] = sum(parts.values())
        return parts

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = batch["pixel_values"]
        if self._gen is None or self._gen.device != x.device:
            self._gen = torch.Generator(x.device).manual_seed(self.hparams.seed + self.global_rank)
        targets = batch_targets([m["scene"] for m in batch["meta"]], x.device)
        parts = self._losses(self.model(augment(x, self._gen, **self.augment_kwargs)), targets)
        self.guard_loss(parts["loss"])
        self.log("train/loss", parts["loss"], prog_bar=True)
        self.log_dict({f"train/loss_{k}": v for k, v in parts.items() if k != "loss"})
        self.log("data/skipped", float(batch["skipped"]), reduce_fx="sum")
        return parts["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        scenes = [m["scene"] for m in batch["meta"]]
        logits = self.model(batch["pixel_values"])
        parts = self._losses(logits, batch_targets(scenes, batch["pixel_values"].device))
        self.log("val/loss", parts["loss"], prog_bar=True, batch_size=len(scenes))
        self._val_preds += logits_to_scenes(logits)
        self._val_scenes += scenes

    def on_validation_epoch_end(self) -> None:
        if not self._val_preds:
            return
        acc = attribute_accuracies(self._val_preds, self._val_scenes)
        self.val_metrics = {**acc, "n": len(self._val_preds)}
        self.log("val/alignment", acc.pop("alignment"), prog_bar=True)
        self.log_dict({f"val/acc_{k}": v for k, v in acc.items()})
        self._val_preds, self._val_scenes = [], []

    def configure_optimizers(self):
        # linear warm-up, then cosine to zero at max_steps (constant when max_steps is unset)
        total = max(int(self.trainer.max_steps), 1) if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        return adamw_with_warmup(self.model.parameters(), self.hparams.lr, self.hparams.weight_decay,
                                 self.hparams.warmup_steps, total)

    def export(self, dirpath: str | Path) -> Path:
        """Write ``model.safetensors`` and ``config.json`` (architecture, vocabulary, val metrics) to ``dirpath``."""
        return save_evaluator(self.model, dirpath, extra={
            "global_step": int(self.global_step) if self._trainer is not None else 0,
            "val_metrics": self.val_metrics,
        })
