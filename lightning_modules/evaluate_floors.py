"""The evaluation floors of the embedded world, and the scoring functions generated images go through.

    python -m lightning_modules.evaluate_floors --evaluator assets/embedded-evaluator \
        --test 'runs/data/shapes/test/{00000..00003}.tar' --n 2000 --out docs/floors.json

Protocol (the same for the floors and for any generator):

- the test split is read in a fixed order (sorted by key); ``test[0, n)`` supplies the prompts
  (captions + ground-truth scenes), ``test[n, 2n)`` the *reference* images for FID;
- a generator makes one image per prompt of ``test[0, n)``; ``score_images`` scores them: FID of
  their evaluator features against the reference features (with a bootstrap interval over the
  generated images), and alignment of the scenes the evaluator sees with the prompts' scenes;
- the floor is that same scoring applied to the real images of ``test[0, n)``: what a perfect
  generator would get. FID's floor is not 0 (two finite samples of the same distribution differ)
  and alignment's ceiling is not 1 (the evaluator errs); generated scores are read against them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from lightning_modules.evaluator import accuracies_by_objects, attribute_accuracies, load_evaluator, predict_scenes
from lightning_modules.metrics import fid_bootstrap, image_features, to_uint8


def real_test_set(test_shards: str | list[str], n: int, offset: int = 0,
                  resolution: int = 32) -> tuple[torch.Tensor, list[dict], list[str]]:
    """Real images ``[offset, offset + n)`` of the test shards in key order: (uint8 (n,3,H,W), scenes, captions).

    Read once through ``LaionStream`` in finite mode (no resampling, no shuffling, samples without
    JSON skipped); the uint8 pixels are exactly the decoded JPEGs.
    """
    from data.laion import LaionStream

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
    the generated images, see ``metrics.fid_bootstrap``), ``alignment`` (exact match on cells,
    shape, colour, background; see ``evaluator``) with its binomial standard error,
    ``size_accuracy`` (per object) and the other per-attribute accuracies, and ``by_objects``
    (alignment, shape, colour, cells per number of prompt objects).
    """
    if len(images) != len(prompt_scenes):
        raise ValueError(f"{len(images)} images for {len(prompt_scenes)} prompts")
    u8 = to_uint8(images)
    feats = image_features(u8, evaluator)
    fid, low, high = fid_bootstrap(feats, ref_features, n=n_bootstrap, seed=seed)
    preds = predict_scenes(evaluator, u8.float() / 127.5 - 1.0)
    acc = attribute_accuracies(preds, prompt_scenes)
    p, n = acc["alignment"], len(preds)
    return {
        "n": n, "n_ref": int(len(ref_features)),
        "fid": fid, "fid_low": low, "fid_high": high, "fid_bootstrap": n_bootstrap,
        "alignment": p, "alignment_stderr": float(np.sqrt(p * (1 - p) / max(n, 1))),
        "alignment_with_size": acc["alignment_with_size"], "size_accuracy": acc["size"],
        "shape_accuracy": acc["shape"], "color_accuracy": acc["color"], "cells_accuracy": acc["cells"],
        "count_accuracy": acc["count"], "background_accuracy": acc["background"],
        "by_objects": {k: _round(v) for k, v in accuracies_by_objects(preds, prompt_scenes).items()},
    }


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


def _round(d: dict, digits: int = 4) -> dict:
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in d.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Measure the embedded world's evaluation floors on real test images.")
    p.add_argument("--evaluator", default="assets/embedded-evaluator")
    p.add_argument("--test", default="runs/data/shapes/test/{00000..00003}.tar")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae", default="assets/embedded-sd",
                   help="pipeline folder whose VAE's reconstructions give the alignment ceiling ('' to skip)")
    p.add_argument("--out", default="docs/floors.json")
    a = p.parse_args(argv)

    torch.set_num_threads(1)
    t0 = time.time()
    evaluator = load_evaluator(a.evaluator)
    images, scenes, _ = real_test_set(a.test, 2 * a.n)  # read once: test[0,n) prompts, test[n,2n) reference
    ref_features = image_features(images[a.n:], evaluator)
    t_read = time.time() - t0
    floor = score_images(images[:a.n], scenes[:a.n], ref_features, evaluator, n_bootstrap=a.bootstrap, seed=a.seed)
    # the reference half too, for the evaluator's accuracy on more real images
    acc_b = attribute_accuracies(predict_scenes(evaluator, images[a.n:].float() / 127.5 - 1.0), scenes[a.n:])
    # how far the scores move for known degradations of the same real images (a scale to read FIDs on)
    sensitivity = {}
    for name, kw in {"blur_0.5px": {"blur": 0.5}, "blur_1px": {"blur": 1.0}, "noise_0.05": {"noise": 0.05},
                     "noise_0.1": {"noise": 0.1}}.items():
        r = score_images(degraded(images[:a.n], seed=a.seed, **kw), scenes[:a.n], ref_features, evaluator,
                         n_bootstrap=a.bootstrap, seed=a.seed)
        sensitivity[name] = _round({k: r[k] for k in ("fid", "fid_low", "fid_high", "alignment", "size_accuracy")})
    ceiling = None
    if a.vae:
        from lightning_modules.models import load_vae

        rec = vae_reconstructions(load_vae(a.vae), images[:a.n])
        ceiling = _round(score_images(rec, scenes[:a.n], ref_features, evaluator, n_bootstrap=a.bootstrap, seed=a.seed))
    config = json.loads((Path(a.evaluator) / "config.json").read_text())
    result = {
        "what": "floors of the embedded evaluation: FID real test[0,n) vs real test[n,2n), and the "
                "evaluator's alignment/accuracies on real test images (a perfect generator's scores)",
        "protocol": "prompts = test[0,n) sorted by key; FID reference = evaluator features of test[n,2n); "
                    "score generated images with lightning_modules.evaluate_floors.score_images",
        "evaluator": a.evaluator,
        "evaluator_config": config.get("config"),
        "evaluator_val_metrics": config.get("val_metrics"),
        "test": a.test, "n": a.n, "bootstrap": a.bootstrap, "seed": a.seed,
        "feature_dim": int(ref_features.shape[1]),
        "floor": _round(floor),
        "vae": a.vae or None,
        "vae_ceiling": ceiling,  # real test[0,n) through the VAE: what a teacher on that VAE is read against
        "accuracies_test_n_2n": _round(acc_b),
        "sensitivity_real_test_0_n_degraded": sensitivity,
        "wall_s": {"read_and_reference_features": round(t_read, 1), "total": round(time.time() - t0, 1)},
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"floor": result["floor"], "vae_ceiling": ceiling}, indent=1))
    print(f"wrote {out} in {result['wall_s']['total']} s")
    return result


if __name__ == "__main__":
    main()
