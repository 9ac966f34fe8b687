"""Paired comparisons of two rows scored on the same prompts and noises, with bootstrap intervals.

Two models of the results table are sampled from the same prompt i and noise seed i, so their
scores are paired: resampling the prompt indices once and applying the *same* indices to both rows
keeps the pairing, and the interval of a ratio or difference is then as narrow as the pairing
allows (Efron & Tibshirani 1993, ch. 6; the unpaired interval of a difference is wider whenever
the rows are positively correlated, as two models on the same prompts are). A claim reads its
verdict off the interval, never off the point estimate (``verdict``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from instaflow.evaluation.fid import FrechetToReference, feature_stats

Statistic = Callable[[np.ndarray], float]  # prompt indices (n,) -> the row's score on those prompts


def mean_of(values) -> Statistic:
    """A per-prompt score (alignment hit, straightness of one path) averaged over the chosen prompts."""
    v = np.asarray(values, dtype=np.float64)
    return lambda idx: float(v[idx].mean())


def fid_of(features, ref_features) -> Statistic:
    """FID of the chosen prompts' generated features against fixed reference features."""
    f = np.asarray(features, dtype=np.float64)
    to_ref = FrechetToReference(*feature_stats(ref_features))
    return lambda idx: max(float(to_ref(*feature_stats(f[idx]))), 0.0)


def mean_over(stats: list[Statistic]) -> Statistic:
    """Several rows' statistics averaged on the same prompts: one row pooled over training seeds."""
    return lambda idx: float(np.mean([s(idx) for s in stats]))


def paired_bootstrap(stat_a: Statistic, stat_b: Statistic, n_items: int, combine: str = "ratio", n: int = 1000,
                     seed: int = 0, level: float = 0.95) -> dict:
    """``a / b`` (or ``a - b``) with a paired bootstrap interval: both rows resampled on the same indices.

    Returns {value, low, high, level, n_bootstrap, combine}; the interval is the percentile
    interval of the resampled combination (each resample draws ``n_items`` indices with
    replacement, once, for both rows).
    """
    if combine not in ("ratio", "difference"):
        raise ValueError(f"combine must be 'ratio' or 'difference', got {combine!r}")
    op = (lambda x, y: x / y) if combine == "ratio" else (lambda x, y: x - y)
    everything = np.arange(n_items)
    value = op(stat_a(everything), stat_b(everything))
    rng = np.random.default_rng(seed)
    boots = np.empty(n)
    for i in range(n):
        idx = rng.integers(0, n_items, n_items)  # the same prompts for both rows
        boots[i] = op(stat_a(idx), stat_b(idx))
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return {"value": float(value), "low": float(lo), "high": float(hi), "level": level, "n_bootstrap": n,
            "combine": combine}


def verdict(interval: dict, target: float, holds_if: str) -> str:
    """"holds" when the whole interval is on the claim's side of ``target`` (``holds_if`` "<=" or ">="),
    "does not hold" when the whole interval is on the other side, "cannot tell" when it straddles it."""
    lo, hi = interval["low"], interval["high"]
    if holds_if == "<=":
        return "holds" if hi <= target else "does not hold" if lo > target else "cannot tell"
    if holds_if == ">=":
        return "holds" if lo >= target else "does not hold" if hi < target else "cannot tell"
    raise ValueError(f"holds_if must be '<=' or '>=', got {holds_if!r}")


def judged(stat_a: Statistic, stat_b: Statistic, n_items: int, combine: str, target: float, holds_if: str,
           n: int = 1000, seed: int = 0) -> dict:
    """A claim's record: the paired interval (floats to 4 digits), its ``target``, ``holds_if`` and ``verdict``."""
    iv = paired_bootstrap(stat_a, stat_b, n_items, combine=combine, n=n, seed=seed)
    return {**{k: round(v, 4) if isinstance(v, float) else v for k, v in iv.items()},
            "target": target, "holds_if": holds_if, "verdict": verdict(iv, target, holds_if)}
