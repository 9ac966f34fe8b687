"""Exponential moving average of the trainable weights, swapped in for evaluation and export."""

from __future__ import annotations

from contextlib import contextmanager

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from instaflow.contracts import TrainsNetworks, student_network
from instaflow.flow.checks import checked_number


class EMA(Callback):
    """EMA of the student's trainable parameters (element-wise, so it works on local shards).

    The student is the first of the module's ``trained_networks()`` (``contracts.TrainsNetworks``; a network a
    loss trains, such as a discriminator, is checkpointed but not averaged); ``attr`` names a module attribute
    instead (null: the contract, else ``unet`` for modules without it, as the embedded teacher's YAML says).

    Updated once per applied optimizer step (``optimizer.step`` ran: ``on_before_optimizer_step``), not
    per micro-batch and not on a step the module skipped (``lightning_modules.nonfinite``: a non-finite
    gradient): with ``accumulate_grad_batches`` k the weights change every k batches, and so does the
    average (and ``warmup`` counts applied steps). The average only ever holds finite values: it refuses
    (FloatingPointError naming the step, on every rank) to average non-finite weights, and to load a
    checkpoint whose average is not finite. It is used for validation, image grids and export
    (``swapped``), kept in the checkpoint, and restored on resume. ``warmup`` uses decay
    min(decay, (1 + n) / (10 + n)) so early averages are not dominated by the random initialisation.
    ``decay`` must be in [0, 1) (checked when built).
    """

    def __init__(self, decay: float = 0.999, attr: str | None = None, warmup: bool = True) -> None:
        if isinstance(decay, bool):
            raise ValueError(f"EMA decay must be a number in [0, 1), got {decay!r}")
        checked_number(decay, "EMA decay", lambda v: 0.0 <= v < 1.0,
                       "a number in [0, 1) (e.g. 0.999; 0 keeps the latest weights)")
        self.decay = decay
        self._attr = attr
        self.warmup = warmup
        self.shadow: list[torch.Tensor] | None = None
        self.num_updates = 0
        self._loaded: dict | None = None
        self._stepped = False  # optimizer.step ran since the last update

    @property
    def attr(self) -> str:
        """The averaged network's attribute (its key prefix in checkpoints): ``attr``, or the student's "unet"."""
        return self._attr or "unet"

    def network(self, pl_module: L.LightningModule) -> torch.nn.Module:
        """The averaged network: ``pl_module.<attr>`` when ``attr`` is set, else the contract's student."""
        if self._attr is None and isinstance(pl_module, TrainsNetworks):
            return student_network(pl_module)
        net = getattr(pl_module, self.attr, None)
        if not isinstance(net, torch.nn.Module):
            raise AttributeError(f"EMA: {type(pl_module).__name__} has no network '{self.attr}' and no "
                                 "trained_networks() (contracts.TrainsNetworks); set init_args.attr")
        return net

    def _params(self, pl_module: L.LightningModule) -> list[torch.nn.Parameter]:
        return [p for p in self.network(pl_module).parameters() if p.requires_grad]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._init_shadow(pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stepped = False
        # strategies that restore after setup (ModelParallelStrategy) load the checkpoint after on_fit_start
        if self._loaded is not None:
            self._init_shadow(pl_module)

    def _init_shadow(self, pl_module: L.LightningModule) -> None:
        params = self._params(pl_module)
        if self._loaded is not None:
            if not all(torch.isfinite(s).all() for s in self._loaded["shadow"]):
                raise FloatingPointError("the checkpoint's EMA holds non-finite values (a run poisoned by a NaN step "
                                         "before the non-finite guard): resume from an earlier checkpoint, or start "
                                         "afresh (--resume.auto false)")
            self.shadow = [_like(s, p) for s, p in zip(self._loaded["shadow"], params)]
            self.num_updates = self._loaded["num_updates"]
            self._loaded = None
        elif self.shadow is None:
            self.shadow = [p.detach().clone() for p in params]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._stepped = True  # only when optimizer.step runs: not on accumulation micro-batches nor skipped steps

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._stepped:  # a micro-batch of gradient accumulation, or a skipped step: the weights did not move
            return
        self._stepped = False
        params = self._params(pl_module)
        if not _finite_everywhere(trainer, params):
            raise FloatingPointError(f"EMA: the weights are not finite after step {trainer.global_step}; the average "
                                     "is not updated with them (lower the learning rate, check the data, or resume "
                                     "from an earlier checkpoint)")
        self.num_updates += 1
        n = self.num_updates
        decay = min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay
        torch._foreach_lerp_(self.shadow, [p.detach() for p in params], 1.0 - decay)

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


def _finite_everywhere(trainer: L.Trainer, params: list[torch.Tensor]) -> bool:
    """Whether every weight is finite on every rank: FSDP2 shards differ per rank, so their verdicts are summed
    (one all-reduce) and every rank decides alike; replicated weights (one device, DDP) need no collective."""
    from torch.distributed.tensor import DTensor

    sharded = any(isinstance(p, DTensor) for p in params)
    local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
    bad = torch.stack([~torch.isfinite(p).all() for p in local]).any().float() if local else torch.tensor(0.0)
    if sharded:
        bad = trainer.strategy.reduce(bad.reshape(1).to(trainer.strategy.root_device), reduce_op="sum")
    return float(bad.sum()) == 0.0


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
