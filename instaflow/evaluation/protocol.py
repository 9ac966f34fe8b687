"""The scoring protocol of the embedded world: the test prompts, the FID reference, and ``score_images``.

Every generated image set in this project is scored here (the results table, the quality curves,
the teacher's evaluation, the floors). Protocol:

- the test split is read in a fixed order (sorted by key); ``test[0, n)`` supplies the prompts
  (captions + ground-truth scenes), ``test[n, 2n)`` the *reference* images for FID;
- a generator makes one image per prompt of ``test[0, n)``; ``score_images`` scores them through
  ``instaflow.evaluation.scoring`` (the path the quality curves and COCO take too): FID of their
  evaluator features against the reference features (with a bootstrap interval over the generated
  images), and alignment of the scenes the evaluator sees with the prompts' scenes;
- the floor (``python -m instaflow.tools.floors``) is that same scoring applied to the real images
  of ``test[0, n)``: what a perfect generator would get. FID's floor is not 0 (two finite samples
  of the same distribution differ) and alignment's ceiling is not 1 (the evaluator errs);
  generated scores are read against them.
"""

from __future__ import annotations

import numpy as np
import torch

from data.laion import LaionStream
from instaflow.evaluation.fid import image_features, to_uint8
from instaflow.evaluation.quality import EmbeddedAlignment, EmbeddedFeatures, PromptSet
from instaflow.evaluation.scoring import aggregate, per_image, reference_of
from instaflow.evaluation.shapes_evaluator import accuracies_by_objects, attribute_accuracies, predict_scenes


def real_test_set(test_shards: str | list[str], n: int, offset: int = 0,
                  resolution: int = 32) -> tuple[torch.Tensor, list[dict], list[str]]:
    """Real images ``[offset, offset + n)`` of the test shards in key order: (uint8 (n,3,H,W), scenes, captions).

    Read once through ``LaionStream`` in finite mode (no resampling, no shuffling, samples without
    JSON skipped); the uint8 pixels are exactly the decoded JPEGs.
    """
    stream = LaionStream(test_shards, resolution=resolution, resampled=False, shuffle_buffer=0, require_meta=True)
    samples = sorted(stream, key=lambda s: s["key"])
    if len(samples) < offset + n:
        raise ValueError(f"{test_shards!r} holds {len(samples)} usable samples; [{offset}, {offset + n}) asked")
    samples = samples[offset:offset + n]
    images = torch.stack([((s["pixel_values"] + 1) * 127.5).round().to(torch.uint8) for s in samples]) \
        if samples else torch.zeros(0, 3, resolution, resolution, dtype=torch.uint8)
    return images, [s["meta"]["scene"] for s in samples], [s["caption"] for s in samples]


def eval_protocol(test_shards: str | list[str], n: int, evaluator: torch.nn.Module) -> dict:
    """What a generator is scored with: prompts (captions, scenes) of ``test[0,n)``, reference features of ``test[n,2n)``.

    Returns ``{captions, scenes, ref_features, real_images}`` (``real_images`` = test[0, n), for the floor).
    """
    images, scenes, captions = real_test_set(test_shards, 2 * n)
    return {"captions": captions[:n], "scenes": scenes[:n], "real_images": images[:n],
            "ref_features": image_features(images[n:], evaluator)}


def score_images(images: torch.Tensor, prompt_scenes: list[dict], ref_features: np.ndarray,
                 evaluator: torch.nn.Module, n_bootstrap: int = 200, seed: int = 0) -> dict:
    """Score images made for ``prompt_scenes``: FID against ``ref_features`` and alignment.

    ``images``: (N, 3, 32, 32) float in [0, 1] (or uint8); they are quantised to uint8 first, as a
    saved PNG would be. Returns ``fid`` with its bootstrap interval ``fid_low``/``fid_high`` (over
    the generated images, see ``fid.fid_bootstrap``), ``alignment`` (exact match on cells,
    shape, colour, background; see ``evaluator``) with its binomial standard error,
    ``size_accuracy`` (per object) and the other per-attribute accuracies, and ``by_objects``
    (alignment, shape, colour, cells per number of prompt objects).
    """
    return score_images_per_image(images, prompt_scenes, ref_features, evaluator, n_bootstrap, seed)[0]


def scene_prompts(prompt_scenes: list[dict]) -> PromptSet:
    """The embedded prompts as ``scoring`` sees them: scene i in ``meta[i]["scene"]``, noise seed i."""
    return PromptSet([""] * len(prompt_scenes), list(range(len(prompt_scenes))), [{"scene": s} for s in prompt_scenes])


def score_images_per_image(images: torch.Tensor, prompt_scenes: list[dict], ref_features: np.ndarray,
                           evaluator: torch.nn.Module, n_bootstrap: int = 200,
                           seed: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    """``score_images`` and the per-image values it was computed from (``scoring.per_image``):
    ``scoring.FEATURES`` (N, D) and the ``alignment`` hits (N,), which the ablation's paired intervals resample."""
    if len(images) != len(prompt_scenes):
        raise ValueError(f"{len(images)} images for {len(prompt_scenes)} prompts")
    u8 = to_uint8(images)
    values = per_image(u8, scene_prompts(prompt_scenes), EmbeddedFeatures.loaded(evaluator),
                       [EmbeddedAlignment.loaded(evaluator)])
    s = aggregate(values, reference_of(ref_features), n_bootstrap, seed)
    preds = predict_scenes(evaluator, u8.float() / 127.5 - 1.0)  # the per-attribute diagnostics beside it
    acc = attribute_accuracies(preds, prompt_scenes)
    p, n = s.means.get("alignment", float("nan")), s.n
    return {
        "n": n, "n_ref": int(len(ref_features)),
        "fid": s.fid, "fid_low": s.fid_low, "fid_high": s.fid_high, "fid_bootstrap": n_bootstrap,
        "alignment": p, "alignment_stderr": float(np.sqrt(p * (1 - p) / max(n, 1))),
        "alignment_with_size": acc["alignment_with_size"], "size_accuracy": acc["size"],
        "shape_accuracy": acc["shape"], "color_accuracy": acc["color"], "cells_accuracy": acc["cells"],
        "count_accuracy": acc["count"], "background_accuracy": acc["background"],
        "by_objects": {k: round_floats(v) for k, v in accuracies_by_objects(preds, prompt_scenes).items()},
    }, values


def round_floats(d: dict, digits: int = 4) -> dict:
    """The float values of ``d`` rounded to ``digits`` (for records people read)."""
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in d.items()}


def degraded(images: torch.Tensor, blur: float = 0.0, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """uint8 images blurred (Gaussian, sigma in pixels) and/or noised (std in [0, 1] units); float in [0, 1]."""
    from torchvision.transforms.functional import gaussian_blur

    x = images.float() / 255
    if blur > 0:
        x = gaussian_blur(x, kernel_size=2 * int(3 * blur + 0.5) + 1, sigma=blur)
    if noise > 0:
        x = x + noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return x.clamp(0, 1)


@torch.no_grad()
def vae_reconstructions(vae, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """uint8 images encoded (posterior mode) and decoded by ``vae``: float in [0, 1], what a generator
    that hit the real images' latents exactly would show. Their scores are the VAE's ceiling (a practical
    one: a generator's latents could decode better than the posterior mode, but rarely do)."""
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
        z = vae.encode(x).latent_dist.mode()
        out.append(((vae.decode(z).sample.float() + 1) / 2).clamp(0, 1))
    return torch.cat(out)
