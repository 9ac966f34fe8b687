"""Regression losses of reflow and distillation (the perceptual loss, which loads a network, is in
``instaflow.models.perceptual``), and the guard every training step applies to its loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def l2_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error (Liu et al. 2022, eq. 1; InstaFlow distillation part 1)."""
    return F.mse_loss(pred.float(), target.float())


def pseudo_huber_loss(pred: torch.Tensor, target: torch.Tensor, c: float = 0.03) -> torch.Tensor:
    """sqrt(||d||^2 + c^2) - c per sample, on per-element means (Song & Dhariwal 2023, iCT, sec. 3.3)."""
    d2 = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return ((d2 + c * c).sqrt() - c).mean()


def check_finite(loss: torch.Tensor, step: int, hint: str = "lower the learning rate or check the data") -> torch.Tensor:
    """``loss`` itself, or a FloatingPointError naming the step: a NaN must stop a run, not train it."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}; {hint}")
    return loss
