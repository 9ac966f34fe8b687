"""Distributions of t in [0, 1] for reflow's training points (0 = noise, 1 = data)."""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def sample_t_uniform(n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
    """t ~ U(0, 1) (Liu et al. 2022, Rectified Flow)."""
    return torch.rand(n, generator=generator, device=device)


def sample_t_logit_normal(n: int, mean: float = 0.0, std: float = 1.0,
                          generator: torch.Generator | None = None, device=None) -> Tensor:
    """t = sigmoid(N(mean, std^2)) (Esser et al. 2024, SD3, sec. 3.1)."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))


def sample_t_u_shaped(n: int, a: float = 4.0, generator: torch.Generator | None = None, device=None) -> Tensor:
    """p(t) proportional to cosh(a (t - 1/2)): mass at both ends (Lee et al. 2024, 2-Rectified-Flow++, eq. 9)."""
    u = torch.rand(n, generator=generator, device=device)
    t = torch.log1p(u * math.expm1(a)) / a  # inverse CDF of p(t) ~ exp(a t) on [0, 1]
    flip = torch.rand(n, generator=generator, device=device) < 0.5
    return torch.where(flip, 1.0 - t, t)


TIME_SAMPLERS = {"uniform": sample_t_uniform, "logit_normal": sample_t_logit_normal, "u_shaped": sample_t_u_shaped}


def sample_t(name: str, n: int, generator: torch.Generator | None = None, device=None, **kw) -> Tensor:
    """Dispatch to a named time sampler."""
    if name not in TIME_SAMPLERS:
        raise ValueError(f"unknown time distribution {name!r}; choose one of {sorted(TIME_SAMPLERS)}")
    return TIME_SAMPLERS[name](n, generator=generator, device=device, **kw)
