"""Optimizer recipe shared by the trainable modules: AdamW with a linear warm-up, then constant or cosine."""

from __future__ import annotations

import math

import torch


def warmup_cosine_factor(step: int, warmup_steps: int, decay_steps: int | None = None) -> float:
    """Learning-rate factor: linear warm-up, then constant, or cosine to zero at ``decay_steps`` (Loshchilov & Hutter 2017)."""
    warm = max(1, warmup_steps)
    if step < warm or not decay_steps:
        return min(1.0, (step + 1) / warm)
    progress = min(1.0, (step - warm) / max(1, decay_steps - warm))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw_with_warmup(params, lr: float, weight_decay: float, warmup_steps: int, decay_steps: int | None = None) -> dict:
    """AdamW, learning rate ramped linearly over ``warmup_steps`` (InstaFlow: 1k warm-up), then constant
    or, with ``decay_steps``, cosine-decayed to zero at that step."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine_factor(s, warmup_steps, decay_steps))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
