"""One scoring path for every generated image set: the quality curves, the results tables, the ablation, COCO.

    images -> per_image(images, prompts, features, scores)   {"__features": (N, D), <score>: (N,), ...}
           -> aggregate(per_image, reference)                 FID (+ bootstrap interval), mean of each score

``features`` is any ``quality.ImageFeatures`` (the embedded evaluator, clean-fid's Inception, or one
injected by a test); ``scores`` are ``quality.TextImageScore``s (the embedded alignment, CLIP). The
quality callback runs the two halves on either side of its gather (``per_image`` on every rank,
``aggregate`` on rank 0); ``protocol.score_images`` (the results table, the ablation, the floors)
and ``coco.evaluate`` call ``score``. So the same images scored with the same extractor give the same
numbers whichever entry point scored them (tests/evaluation/test_scoring.py). FID is clean-fid's
``frechet_distance`` of float64 feature statistics (``fid.fid_to_stats``), clipped at 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from instaflow.evaluation.fid import feature_stats, fid_to_stats
from instaflow.evaluation.quality import ImageFeatures, PromptSet, TextImageScore

FEATURES = "__features"  # the per-image key of the FID features (a score never starts with "__")


@dataclass(frozen=True)
class Scores:
    """What ``aggregate`` returns: FID (interval NaN without bootstrap) and each per-image score's mean."""

    n: int
    fid: float
    fid_low: float
    fid_high: float
    means: dict[str, float] = field(default_factory=dict)


def per_image(images: torch.Tensor, prompts: PromptSet, features: ImageFeatures,
              scores: Sequence[TextImageScore] = ()) -> dict[str, np.ndarray]:
    """Per-image values of ``images`` (N, 3, H, W) in [0, 1] or uint8: FID features (N, D) and every score (N,)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    out = {FEATURES: np.asarray(features(images))}
    for scorer in scores:
        out.update(scorer(images, prompts))
    return out


def summarize(per_image_scores: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean of each per-image score over the images where it applies (NaN = not applicable)."""
    out = {}
    for name, values in per_image_scores.items():
        v = np.asarray(values, dtype=np.float64)
        ok = ~np.isnan(v)
        if ok.any():
            out[name] = float(v[ok].mean())
    return out


def reference_of(ref_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference statistics (mu, sigma) of (M, D) reference features."""
    return feature_stats(ref_features)


def aggregate(values: dict[str, np.ndarray], reference: tuple[np.ndarray, np.ndarray], n_bootstrap: int = 0,
              seed: int = 0) -> Scores:
    """FID of ``values[FEATURES]`` against ``reference`` (mu, sigma) with its bootstrap interval over the
    generated images (``fid.fid_bootstrap``; none when ``n_bootstrap`` is 0), and every other value's mean."""
    rest = dict(values)
    feats = rest.pop(FEATURES)
    fid, low, high = fid_to_stats(feats, *reference, n=n_bootstrap, seed=seed)
    return Scores(len(feats), fid, low, high, summarize(rest))


def score(images: torch.Tensor, prompts: PromptSet, features: ImageFeatures, scores: Sequence[TextImageScore],
          reference: tuple[np.ndarray, np.ndarray], n_bootstrap: int = 0, seed: int = 0) -> Scores:
    """``aggregate(per_image(...))``: one image set scored in one process."""
    return aggregate(per_image(images, prompts, features, scores), reference, n_bootstrap, seed)
