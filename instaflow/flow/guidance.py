"""Classifier-free guidance: training-time caption dropout and sampling-time combination."""

from __future__ import annotations

from typing import Callable

import torch

from instaflow.flow.checks import checked_number

Tensor = torch.Tensor
VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x_t (B, ...), t (B,)) -> v (B, ...)


def check_guidance(w: float, key: str = "guidance") -> float:
    """``w`` as a float, or a ValueError naming ``key``: guidance must be a finite number >= 0.

    NaN, inf or a negative w would silently sample garbage (or, before, turn guidance off).
    """
    return checked_number(w, key, lambda v: v >= 0, "a finite number >= 0 (1 = no guidance, e.g. 1.5 or 3)")


def check_probability(p: float, key: str) -> float:
    """``p`` as a float, or a ValueError naming ``key`` unless 0 <= p <= 1 (e.g. caption dropout)."""
    return checked_number(p, key, lambda v: 0.0 <= v <= 1.0, "a probability in [0, 1] (e.g. 0.1)")


def keep_mask(n: int, p: float, generator: torch.Generator) -> Tensor:
    """(n,) bool: which of n captions survive caption dropout with probability p (Ho & Salimans 2022, CFG
    training); the one draw behind live captions (``drop_captions``) and stored text states alike."""
    return torch.rand(n, generator=generator) >= p


def drop_captions(captions: list[str], p: float, generator: torch.Generator) -> list[str]:
    """Replace each caption by "" with probability p (Ho & Salimans 2022, CFG training)."""
    keep = keep_mask(len(captions), p, generator)
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def cfg_combine(out_uncond: Tensor, out_cond: Tensor, w: float) -> Tensor:
    """out_u + w (out_c - out_u) (Ho & Salimans 2022, classifier-free guidance, eq. 6)."""
    return out_uncond + w * (out_cond - out_uncond)


def uses_uncond(w: float) -> bool:
    """Whether guidance ``w`` needs the unconditional pass: every w but 1 (where the formula is v_c itself)."""
    return check_guidance(w) != 1.0


def guided(model: Callable[[Tensor, Tensor, Tensor], Tensor], cond: Tensor, uncond: Tensor | None,
           w: float) -> VelocityFn:
    """Close a conditional model over its text states, with guidance v_u + w (v_c - v_u) for every w != 1.

    ``model(x, t, states)``; with w = 1 (the formula is v_c exactly) or without ``uncond`` (a
    guidance-distilled model such as Flux dev takes w as an input instead) only the conditional pass
    runs (InstaFlow samples its one-step model this way); otherwise the batch is doubled and combined
    with ``cfg_combine``: w > 1 extrapolates, 0 <= w < 1 interpolates towards the unconditional model.
    ``cond``/``uncond`` are text states, or any conditioning with a ``cat`` (e.g. ``flow_matching.Conditioning``).
    """
    if not uses_uncond(w) or uncond is None:
        return lambda x, t: model(x, t, cond)

    def fn(x: Tensor, t: Tensor) -> Tensor:
        both = torch.cat([uncond, cond]) if isinstance(cond, Tensor) else type(cond).cat([uncond, cond])
        out_u, out_c = model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return cfg_combine(out_u, out_c, w)

    return fn
