"""Optimizer recipe shared by the trainable modules: AdamW with a linear warm-up, then constant or cosine."""

from __future__ import annotations

import math

import torch

from instaflow.flow.checks import checked_number, is_whole


def check_lr(lr, key: str = "lr") -> float:
    """``lr`` as a float, or a ValueError naming ``key`` unless it is finite and > 0 (a negative or infinite
    learning rate would only show up as a diverged run hours later)."""
    return checked_number(lr, key, lambda v: v > 0, "a finite learning rate > 0 (e.g. 1.0e-4)")


def check_count(n, key: str, minimum: int = 0, optional: bool = False) -> int | None:
    """``n`` as an int, or a ValueError naming ``key`` unless it is a whole number >= ``minimum`` (None allowed
    when ``optional``): warm-up steps, decay steps."""
    if n is None and optional:
        return None
    if not is_whole(n, minimum):
        raise ValueError(f"{key} must be a whole number >= {minimum}{' (or null)' if optional else ''}, got {n!r}")
    return int(n)


def check_nonnegative(x, key: str) -> float:
    """``x`` as a float, or a ValueError naming ``key`` unless it is finite and >= 0 (weight decay, loss weights)."""
    return checked_number(x, key, lambda v: v >= 0, "a finite number >= 0")


def check_optimizer_settings(lr, warmup_steps, weight_decay, decay_steps=None) -> None:
    """Raise a ValueError naming the first bad setting of ``adamw_with_warmup`` (modules call it when built)."""
    check_lr(lr)
    check_count(warmup_steps, "warmup_steps")
    check_nonnegative(weight_decay, "weight_decay")
    check_count(decay_steps, "lr_decay_steps", minimum=1, optional=True)


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
    check_optimizer_settings(lr, warmup_steps, weight_decay, decay_steps)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine_factor(s, warmup_steps, decay_steps))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
