"""Optimizer recipe shared by the trainable modules: AdamW with a linear learning-rate warm-up."""

from __future__ import annotations

import torch


def adamw_with_warmup(params, lr: float, weight_decay: float, warmup_steps: int) -> dict:
    """AdamW, learning rate ramped linearly over ``warmup_steps`` then constant (InstaFlow: 1k warm-up)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warm = max(1, warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
