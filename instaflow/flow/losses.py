"""Regression losses of reflow and distillation as pure functions (the loss objects a stage takes, LPIPS
included, are in ``instaflow.losses``), and what the non-finite guard of every training step checks
(``lightning_modules.nonfinite``: a step whose loss or gradient is not finite is skipped or stops the run)."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

NONFINITE_MODES = ("skip", "stop")


def l2_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error (Liu et al. 2022, eq. 1; InstaFlow distillation part 1)."""
    return F.mse_loss(pred.float(), target.float())


def pseudo_huber_per_sample(pred: torch.Tensor, target: torch.Tensor, c: float = 0.03) -> torch.Tensor:
    """(B,) sqrt(||d||^2 + c^2) - c of each sample, on per-element means (Song & Dhariwal 2023, iCT, sec. 3.3)."""
    d2 = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return (d2 + c * c).sqrt() - c


def pseudo_huber_loss(pred: torch.Tensor, target: torch.Tensor, c: float = 0.03) -> torch.Tensor:
    """The batch mean of ``pseudo_huber_per_sample`` (Song & Dhariwal 2023, iCT, sec. 3.3)."""
    return pseudo_huber_per_sample(pred, target, c).mean()


def check_finite(loss: torch.Tensor, step: int, hint: str = "lower the learning rate or check the data") -> torch.Tensor:
    """``loss`` itself, or a FloatingPointError naming the step: a NaN must stop a run, not train it."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}; {hint}")
    return loss


def check_nonfinite_setting(mode: str, limit: int) -> None:
    """Raise a ValueError naming the bad key unless ``nonfinite`` is skip|stop and ``nonfinite_limit`` >= 1."""
    if mode not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_MODES} (skip: a step with a non-finite loss or "
                         f"gradient is not applied and is counted; stop: the run raises), got {mode!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"nonfinite_limit must be a whole number >= 1 (consecutive skipped steps before the run "
                         f"stops), got {limit!r}")


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: the local shard of an FSDP2 DTensor (no collective), else ``t`` itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def all_finite(tensors: Iterable[torch.Tensor | None]) -> torch.Tensor:
    """A 0-d bool tensor: every element of every (local part of a) tensor is finite; None entries are ignored.

    No collective and no host sync: under FSDP2 each rank sees its own shards, so the caller reduces the
    flag over ranks before acting on it.
    """
    flags = [torch.isfinite(local_tensor(t)).all() for t in tensors if t is not None]
    if not flags:
        return torch.tensor(True)
    return torch.stack([f.to(flags[0].device) for f in flags]).all()
