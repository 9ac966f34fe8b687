"""Full vs LoRA reflow training on the embedded world: step time, trainable state and peak memory.

    python -m benchmarks.bench_lora            # both modes, each in its own process (clean peak RSS)

The embedded teacher (assets/embedded-sd), batch 64, velocity_wrapper, stored-state-free captions
from the text cache; ReflowTraining.loss + backward + AdamW step (the module's own optimizer, so only
trainable parameters get moments); median of 8 steps after 3 of warm-up. Memory: the bytes of
trainable weights, their gradients and AdamW's two moments (what DDP keeps per GPU beyond the frozen
weights), and the process's peak resident set (CPU: there is no CUDA allocator to ask).
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

import torch

BATCH = 64


def measure(lora_rank: int | None) -> dict:
    from instaflow.flow.noise import latent_shape
    from lightning_modules.reflow import ReflowTraining

    model = ReflowTraining("assets/embedded-sd", parameterization="velocity_wrapper", lora_rank=lora_rank)
    model.configure_model()
    opt = model.configure_optimizers()["optimizer"]
    g = torch.Generator().manual_seed(0)
    shape = (BATCH, *latent_shape(model.unet.config))  # (B, 4, 8, 8)
    captions = [f"a large red circle in the center on a white background number {i % 8}" for i in range(BATCH)]
    times = []
    for _ in range(11):
        b = {"x0": torch.randn(shape, generator=g), "x1": torch.randn(shape, generator=g), "caption": captions}
        t0 = time.perf_counter()
        model.loss(b, g, 0.1).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    trainable = [p for p in model.unet.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    return {"mode": f"lora r={lora_rank}" if lora_rank else "full", "step_ms": round(1000 * statistics.median(times[3:]), 1),
            "trainable_params": n_train, "unet_params": sum(p.numel() for p in model.unet.parameters()) - (n_train if lora_rank else 0),
            "train_state_mb": round(4 * n_train * 4 / 2**20, 2),  # fp32 weights + grads + 2 AdamW moments
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> list[dict]:
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        rank = None if sys.argv[2] == "full" else int(sys.argv[2])
        print(json.dumps(measure(rank)))
        return []
    rows = []
    for mode in ("full", "4", "16", "full", "4", "16"):  # two interleaved rounds
        out = subprocess.run([sys.executable, "-m", "benchmarks.bench_lora", "--one", mode], capture_output=True,
                             text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
        print(rows[-1])
    return rows


if __name__ == "__main__":
    main()
