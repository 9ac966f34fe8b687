"""Measure the evaluation floors of the embedded world on real test images into docs/floors.json.

    python -m instaflow.tools.floors --evaluator assets/embedded-evaluator \
        --test 'runs/data/shapes/test/{00000..00003}.tar' --n 2000 --out docs/floors.json

The floor is the scoring protocol (``instaflow.evaluation.protocol``) applied to real images:
FID real test[0, n) vs real test[n, 2n), the evaluator's alignment on real images, how far the
scores move under known degradations, and the VAE's reconstruction ceiling.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from instaflow.evaluation.protocol import degraded, real_test_set, round_floats, score_images, vae_reconstructions
from instaflow.evaluation.fid import image_features
from instaflow.evaluation.shapes_evaluator import attribute_accuracies, load_evaluator, predict_scenes
from instaflow.models.loading import load_vae


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
        sensitivity[name] = round_floats({k: r[k] for k in ("fid", "fid_low", "fid_high", "alignment", "size_accuracy")})
    ceiling = None
    if a.vae:
        rec = vae_reconstructions(load_vae(a.vae), images[:a.n])
        ceiling = round_floats(score_images(rec, scenes[:a.n], ref_features, evaluator, n_bootstrap=a.bootstrap, seed=a.seed))
    config = json.loads((Path(a.evaluator) / "config.json").read_text())
    result = {
        "what": "floors of the embedded evaluation: FID real test[0,n) vs real test[n,2n), and the "
                "evaluator's alignment/accuracies on real test images (a perfect generator's scores)",
        "protocol": "prompts = test[0,n) sorted by key; FID reference = evaluator features of test[n,2n); "
                    "score generated images with instaflow.evaluation.protocol.score_images",
        "evaluator": a.evaluator,
        "evaluator_config": config.get("config"),
        "evaluator_val_metrics": config.get("val_metrics"),
        "test": a.test, "n": a.n, "bootstrap": a.bootstrap, "seed": a.seed,
        "feature_dim": int(ref_features.shape[1]),
        "floor": round_floats(floor),
        "vae": a.vae or None,
        "vae_ceiling": ceiling,  # real test[0,n) through the VAE: what a teacher on that VAE is read against
        "accuracies_test_n_2n": round_floats(acc_b),
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
