"""Measure the velocity conversion's boundary choices (``flow.velocity.BOUNDARIES``) on val prompts.

    python -m instaflow.tools.boundary --model assets/embedded-sd --out docs/velocity_boundary.json

Each model folder (a diffusion UNet: the teacher, i.e. the 2-RF's step-0 model, or a model trained
through the conversion) is sampled with Euler in flow time under every boundary choice, from the
same val prompts and noises, and scored (FID against val images, alignment). Val only: the test
split is kept for the final tables.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from instaflow.evaluation.protocol import eval_protocol, round_floats, score_images
from instaflow.evaluation.shapes_evaluator import load_evaluator
from instaflow.flow.velocity import BOUNDARIES, BOUNDARY, DiffusionVelocity
from instaflow.flow import diffusion
from instaflow.models.families import load_family


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="model folder (repeatable)")
    p.add_argument("--val", default="runs/data/shapes/val/{00000..00001}.tar")
    p.add_argument("--evaluator", default="assets/embedded-evaluator")
    p.add_argument("--n", type=int, default=500, help="val prompts val[0, n); FID reference val[n, 2n)")
    p.add_argument("--settings", default="1:1,2:1.5,8:1.5", help="steps:guidance pairs (Euler)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    evaluator = load_evaluator(a.evaluator)
    proto = eval_protocol(a.val, a.n, evaluator)
    seeds = list(range(a.n))
    settings = [(int(s), float(w)) for s, w in (x.split(":") for x in a.settings.split(","))]
    out = {"protocol": f"val prompts [0, {a.n}) of {a.val}, noise seeds 0..{a.n - 1}, FID vs val images "
                       f"[{a.n}, {2 * a.n}); Euler in flow time; bf16={a.bf16}",
           "machine": platform.platform(), "current": BOUNDARY, "rows": []}
    for folder in a.model:
        model = load_family(folder, text_cache_size=a.n + 1)
        model.bf16 = a.bf16
        for boundary in BOUNDARIES:
            model.velocity_module = DiffusionVelocity(model.unet, diffusion.alphas_cumprod(model.scheduler_config),
                                                      model.scheduler_config.get("prediction_type", "epsilon"), boundary)
            for steps, w in settings:
                model.kind = "ddpm_velocity"  # Euler in flow time through the conversion
                images = model.sample_images(proto["captions"], steps, w, seeds)
                s = score_images(images, proto["scenes"], proto["ref_features"], evaluator)
                row = {"model": folder, "boundary": boundary, "steps": steps, "guidance": w,
                       **round_floats({k: s[k] for k in ("fid", "fid_low", "fid_high", "alignment")})}
                out["rows"].append(row)
                print(json.dumps(row), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
