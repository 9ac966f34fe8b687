"""Classifier-free guidance: training-time caption dropout and sampling-time combination."""

from __future__ import annotations

from typing import Callable

import torch

Tensor = torch.Tensor
VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x_t (B, ...), t (B,)) -> v (B, ...)


def drop_captions(captions: list[str], p: float, generator: torch.Generator) -> list[str]:
    """Replace each caption by "" with probability p (Ho & Salimans 2022, CFG training)."""
    keep = torch.rand(len(captions), generator=generator) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def cfg_combine(out_uncond: Tensor, out_cond: Tensor, w: float) -> Tensor:
    """out_u + w (out_c - out_u) (Ho & Salimans 2022, classifier-free guidance, eq. 6)."""
    return out_uncond + w * (out_cond - out_uncond)


def guided(model: Callable[[Tensor, Tensor, Tensor], Tensor], cond: Tensor, uncond: Tensor | None,
           w: float) -> VelocityFn:
    """Close a conditional model over its text states, with guidance when w > 1 (diffusers' rule).

    ``model(x, t, states)``; with w <= 1 only the conditional pass runs (InstaFlow samples its
    one-step model this way), otherwise the batch is doubled and combined with ``cfg_combine``.
    ``cond``/``uncond`` are text states, or any conditioning with a ``cat`` (e.g. ``flow_matching.Conditioning``).
    """
    if w <= 1.0 or uncond is None:
        return lambda x, t: model(x, t, cond)

    def fn(x: Tensor, t: Tensor) -> Tensor:
        both = torch.cat([uncond, cond]) if isinstance(cond, Tensor) else type(cond).cat([uncond, cond])
        out_u, out_c = model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return cfg_combine(out_u, out_c, w)

    return fn
