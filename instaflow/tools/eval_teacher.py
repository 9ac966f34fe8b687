"""Score the embedded teacher: FID (evaluator features) and prompt alignment on test prompts.

    python -m instaflow.tools.eval_teacher --teacher assets/embedded-sd \
        --evaluator assets/embedded-evaluator --test 'runs/data/shapes/test/{00000..00003}.tar' \
        --n 2000 --guidance 1.5 3 5 --out docs/teacher_eval.json --grid docs/teacher_samples.png

Protocol (written into the output next to every number): the first ``n`` test captions (sorted
by key) are sampled from noise seeds 0..n-1 with 25-step DPM-Solver++; FID compares those images
with the real test images [n, 2n) (as the floor in docs/floors.json does); alignment is the
evaluator's exact-match rate.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from instaflow.evaluation.grids import make_grid, save_png
from instaflow.evaluation.protocol import eval_protocol, score_images
from instaflow.evaluation.shapes_evaluator import load_evaluator
from instaflow.models.families import load_family


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="assets/embedded-sd")
    p.add_argument("--evaluator", default="assets/embedded-evaluator")
    p.add_argument("--test", default="runs/data/shapes/test/{00000..00003}.tar")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--out", default="docs/teacher_eval.json")
    p.add_argument("--grid", default="docs/teacher_samples.png")
    p.add_argument("--grid-n", type=int, default=32)
    a = p.parse_args(argv)

    evaluator = load_evaluator(a.evaluator)
    proto = eval_protocol(a.test, a.n, evaluator)
    images, scenes, captions, ref = proto["real_images"], proto["scenes"], proto["captions"], proto["ref_features"]
    model = load_family(a.teacher)
    results = {"protocol": {
        "teacher": a.teacher, "solver": f"DPM-Solver++(2M), {a.steps} steps, trailing spacing, final sigma 0",
        "prompts": f"first {a.n} captions of {a.test} (sorted by key)", "noise_seeds": f"{a.seed}..{a.seed + a.n - 1}",
        "reference": f"real test images [{a.n}, {2 * a.n}) (disjoint from the prompts' own images)", "features": f"embedded evaluator {a.evaluator}",
        "fid_interval": "95% bootstrap over generated samples",
    }, "runs": []}
    grids = []
    for w in a.guidance:
        t0 = time.time()
        gen = model.sample(captions, steps=a.steps, guidance=w, seed=a.seed, batch_size=a.batch_size)
        wall = time.time() - t0
        score = score_images(gen, scenes, ref, evaluator)
        score.update(guidance=w, steps=a.steps, sample_wall_s=round(wall, 1))
        results["runs"].append(score)
        print(json.dumps(score))
        grids.append(gen[: a.grid_n])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2))
    if a.grid:
        # rows of 8: real images, then the teacher at each guidance, same captions
        real = images[: a.grid_n].float() / 255 if images.dtype == torch.uint8 else images[: a.grid_n]
        rows = [real] + grids
        save_png(make_grid(torch.cat(rows), nrow=8), a.grid, scale=4)
        Path(a.grid).with_suffix(".txt").write_text(
            "rows of 8; blocks of 4 rows: real test images, then the teacher at guidance "
            + ", ".join(f"{w:g}" for w in a.guidance) + "\n\n" + "\n".join(
                f"{i}: {c}" for i, c in enumerate(captions[: a.grid_n])))
    return results


if __name__ == "__main__":
    main()
