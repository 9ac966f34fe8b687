"""Exponential moving average of the trainable weights, swapped in for evaluation and export."""

from __future__ import annotations

from contextlib import contextmanager

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class EMA(Callback):
    """EMA of ``pl_module.<attr>``'s trainable parameters (element-wise, so it works on local shards).

    Updated once per optimizer step (``trainer.global_step`` moved), not per micro-batch: with
    ``accumulate_grad_batches`` k the weights change every k batches, and so does the average
    (and ``warmup`` counts optimizer steps). The average is used for validation, image grids and
    export (``swapped``), kept in the checkpoint, and restored on resume. ``warmup`` uses decay
    min(decay, (1 + n) / (10 + n)) so early averages are not dominated by the random initialisation.
    """

    def __init__(self, decay: float = 0.999, attr: str = "unet", warmup: bool = True) -> None:
        self.decay = decay
        self.attr = attr
        self.warmup = warmup
        self.shadow: list[torch.Tensor] | None = None
        self.num_updates = 0
        self._loaded: dict | None = None
        self._last_step: int | None = None  # trainer.global_step at the last update

    def _params(self, pl_module: L.LightningModule) -> list[torch.nn.Parameter]:
        return [p for p in getattr(pl_module, self.attr).parameters() if p.requires_grad]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._init_shadow(pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step  # 0, or the step a resumed run continues from
        # strategies that restore after setup (ModelParallelStrategy) load the checkpoint after on_fit_start
        if self._loaded is not None:
            self._init_shadow(pl_module)

    def _init_shadow(self, pl_module: L.LightningModule) -> None:
        params = self._params(pl_module)
        if self._loaded is not None:
            self.shadow = [_like(s, p) for s, p in zip(self._loaded["shadow"], params)]
            self.num_updates = self._loaded["num_updates"]
            self._loaded = None
        elif self.shadow is None:
            self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last_step:  # a micro-batch of gradient accumulation: no step yet
            return
        self._last_step = trainer.global_step
        self.num_updates += 1
        n = self.num_updates
        decay = min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self._params(pl_module)], 1.0 - decay)

    @contextmanager
    def swapped(self, pl_module: L.LightningModule):
        """Temporarily load the averaged weights into the module."""
        if self.shadow is None:
            yield
            return
        params = self._params(pl_module)
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.shadow is None:
            return
        self._ctx = self.swapped(pl_module)
        self._ctx.__enter__()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.restore_training_weights()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # an error or SIGTERM inside validation must not leave the average in the module (a checkpoint
        # saved after it would hold the EMA as the training weights)
        self.restore_training_weights()

    def restore_training_weights(self) -> None:
        """Leave the validation swap, if inside it (idempotent)."""
        ctx = getattr(self, "_ctx", None)
        if ctx is not None:
            self._ctx = None
            ctx.__exit__(None, None, None)

    def state_dict(self) -> dict:
        # FSDP2 shards are gathered (a collective: Lightning asks every rank), so rank 0 saves whole tensors
        return {"shadow": [_full(s).cpu() for s in self.shadow] if self.shadow else None,
                "num_updates": self.num_updates}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("shadow") is not None:
            self._loaded = state_dict


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _like(saved: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A saved whole tensor placed like parameter ``p`` (re-sharded when ``p`` is an FSDP2 DTensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor):
        return distribute_tensor(saved.to(p.device, p.dtype), p.device_mesh, p.placements)
    return saved.to(p.device, p.dtype)


def find_ema(trainer: L.Trainer) -> EMA | None:
    return next((c for c in trainer.callbacks if isinstance(c, EMA)), None)
