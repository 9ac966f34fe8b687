"""The rectified-flow path x_t = t x1 + (1 - t) x0, its target velocity and the UNet timestep."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def bcast(t: Tensor, x: Tensor) -> Tensor:
    """Shape (B,) -> (B, 1, 1, ...) to broadcast against x."""
    return t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def interpolate(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """x_t = t x1 + (1 - t) x0 (Liu et al. 2022, Rectified Flow, eq. 1)."""
    t = bcast(t, x0)
    return t * x1 + (1 - t) * x0


def velocity_target(x0: Tensor, x1: Tensor) -> Tensor:
    """The straight-line velocity x1 - x0 that reflow regresses on (Liu et al. 2022, eq. 1)."""
    return x1 - x0


def rf_unet_timestep(t: Tensor) -> Tensor:
    """UNet timestep of the released InstaFlow / 2-RF models: 1000 (1 - t) (InstaFlow code, pipeline_rf.py)."""
    return 1000.0 * (1.0 - t)
