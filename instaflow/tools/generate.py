"""Generate images for given prompts with any model folder (teacher, 2-RF or one-step) into PNGs and a grid.

    python -m instaflow.tools.generate --model runs/embedded/models/instaflow --steps 1 \
        --prompt "a large red circle in the center on a white background" --out runs/generate

Writes ``<out>/<i>_<seed>.png`` (one per prompt x seed), ``<out>/grid.png`` (rows = prompts; each image captioned with its prompt, steps, guidance and seed) and
``<out>/generation.json`` (model, steps, guidance, seeds, prompts, seconds), so an image can be
regenerated exactly: prompt i with seed s always starts from the same noise.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from instaflow.evaluation.grids import captioned_grid, save_png
from instaflow.models.families import load_family
from instaflow.state import atomic_write_json


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="pipeline folder or hub id")
    p.add_argument("--prompt", action="append", default=[], help="repeatable")
    p.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument("--steps", type=int, default=1, help="Euler steps (flow models) or DPM-Solver++ steps (diffusion)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance w (1 = conditional only)")
    p.add_argument("--seed", type=int, default=0, help="first noise seed")
    p.add_argument("--num-per-prompt", type=int, default=4)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the UNet")
    p.add_argument("--scale", type=int, default=4, help="PNG upscaling (nearest) for small images")
    p.add_argument("--out", default="runs/generate")
    a = p.parse_args(argv)

    prompts = list(a.prompt)
    if a.prompts_file:
        prompts += [ln.strip() for ln in Path(a.prompts_file).read_text().splitlines() if ln.strip()]
    if not prompts:
        p.error("give at least one --prompt or a --prompts-file")
    model = load_family(a.model)  # any family's folder
    model.bf16 = a.bf16
    k = a.num_per_prompt
    seeds = [a.seed + j for _ in prompts for j in range(k)]
    t0 = time.perf_counter()
    flat = [q for q in prompts for _ in range(k)]
    images = model.sample_images(flat, a.steps, a.guidance, seeds)  # (P*k, 3, H, W)
    seconds = time.perf_counter() - t0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (img, s) in enumerate(zip(images, seeds)):
        save_png(img, out / f"{i // k:03d}_{s}.png", a.scale)
    captions = [f"{q} [{a.steps} step{'s' if a.steps > 1 else ''}, w {a.guidance:g}, seed {s}]"
                for q, s in zip(flat, seeds)]
    save_png(captioned_grid(images, captions, nrow=k, scale=a.scale), out / "grid.png")
    atomic_write_json(out / "generation.json", {
        "model": a.model, "kind": model.kind, "steps": a.steps, "guidance": a.guidance, "bf16": a.bf16,
        "seeds": list(range(a.seed, a.seed + k)), "prompts": prompts, "seconds": round(seconds, 3)})
    print(f"{len(images)} images in {seconds:.2f} s -> {out}/")
    return out


if __name__ == "__main__":
    main()
