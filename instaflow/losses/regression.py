"""Regression losses on latents: L2 (the default of reflow and distillation) and pseudo-Huber."""

from __future__ import annotations

import torch

from instaflow.flow.checks import checked_number
from instaflow.flow.losses import l2_loss, pseudo_huber_loss
from instaflow.losses.base import Loss


class L2(Loss):
    """Mean squared error, ``F.mse_loss(pred.float(), target.float())`` (Liu et al. 2022, eq. 1; InstaFlow part 1)."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return l2_loss(pred, target)


class PseudoHuber(Loss):
    """sqrt(||d||^2 + c^2) - c per sample, on per-element means (Song & Dhariwal 2023, iCT, sec. 3.3).

    Args:
        c: the scale below which it is quadratic (> 0; iCT: 0.00054 sqrt(d) on the per-element sum, ~0.03 here).
    """

    def __init__(self, c: float = 0.03) -> None:
        super().__init__()
        self.c = checked_number(c, "loss.init_args.c (pseudo-Huber)", lambda v: v > 0,
                                "a finite number > 0 (e.g. 0.03)")

    def settings(self) -> dict:
        return {"c": self.c}

    def forward(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return pseudo_huber_loss(pred, target, self.c)
