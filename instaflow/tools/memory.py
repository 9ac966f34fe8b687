"""Memory planning per model family: parameters, and bytes per GPU of weights, gradients and AdamW states.

    python -m instaflow.tools.memory                      # every family, 8 GPUs, LoRA rank 16
    python -m instaflow.tools.memory --gpus 32 --lora-rank 64 --family sdxl --json

The architectures are the families' public config files, their parameter-determining keys written into
``instaflow/models/architectures/*.json`` (no weights); each network is built on the meta device and
its parameters counted. Bytes follow what the training code holds (``FlowStudent``): every network
loaded in fp32 (bf16-mixed autocasts the matmuls, the weights stay fp32); the trainable network also
holds fp32 gradients and AdamW's two fp32 moments (16 bytes per parameter in all). Under FSDP2 the
trainable network's 16 bytes are split over the GPUs (the frozen encoders and VAE stay whole on every
rank, as ``sharding.shard_unet`` leaves them); with LoRA the base network is frozen (4 bytes) and only
the adapter carries 16. Activations, the all-gathered block in flight and allocator overhead are not
counted: they depend on resolution, batch and activation checkpointing (measure them: ``make bench-gpu``).
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import torch

ARCH = Path(__file__).resolve().parents[1] / "models" / "architectures"
GIB = 2 ** 30


def families() -> list[str]:
    return sorted(p.stem for p in ARCH.glob("*.json"))


def _build(spec: dict) -> torch.nn.Module:
    module, name = spec["class"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    with torch.device("meta"):  # shapes only: nothing allocated, nothing downloaded
        if module == "transformers":
            config_cls = cls.config_class
            return cls(config_cls(**spec["config"]))
        return cls(**spec["config"])


def count(family: str, lora_rank: int | None = None) -> dict:
    """Parameter counts of a family's networks (and of a LoRA adapter of ``lora_rank`` on its denoiser)."""
    spec = json.loads((ARCH / f"{family}.json").read_text())
    denoiser = _build(spec["denoiser"])
    out = {"family": family, "name": spec["name"], "source": spec["source"],
           "denoiser": sum(p.numel() for p in denoiser.parameters()),
           "frozen": {k: sum(p.numel() for p in _build(v).parameters()) for k, v in spec["frozen"].items()}}
    if lora_rank:
        from instaflow.models.lora import add_lora

        add_lora(denoiser, lora_rank)
        out["lora_rank"] = lora_rank
        out["lora"] = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    return out


def plan(counts: dict, gpus: int) -> dict:
    """GiB per GPU (fp32 weights; trainable: + fp32 grads + 2 AdamW moments) under DDP, FSDP2 over ``gpus``, LoRA."""
    frozen = 4 * sum(counts["frozen"].values())
    d = counts["denoiser"]
    out = {"ddp": (frozen + 16 * d) / GIB, f"fsdp2_{gpus}": (frozen + 16 * d / gpus) / GIB}
    if "lora" in counts:
        out["lora_ddp"] = (frozen + 4 * d + 16 * counts["lora"]) / GIB
    return {k: round(v, 1) for k, v in out.items()}


def table(rows: list[dict], gpus: int) -> str:
    lora = rows[0].get("lora_rank")
    head = ["family", "denoiser", "text encoders + VAE", "DDP, full", f"FSDP2 over {gpus}, full"]
    head += [f"DDP, LoRA r = {lora} (adapter)"] if lora else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        p = r["plan"]
        cells = [r["name"], f"{r['denoiser'] / 1e9:.3f}B", f"{sum(r['frozen'].values()) / 1e9:.3f}B",
                 f"{p['ddp']} GiB", f"{p[f'fsdp2_{gpus}']} GiB"]
        if lora:
            cells.append(f"{p['lora_ddp']} GiB ({r['lora'] / 1e6:.1f}M)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", action="append", choices=families(), help="repeatable; default: all")
    p.add_argument("--gpus", type=int, default=8, help="GPUs FSDP2 shards the trainable network over")
    p.add_argument("--lora-rank", type=int, default=16, help="0: no LoRA column")
    p.add_argument("--json", action="store_true", help="print JSON instead of the markdown table")
    a = p.parse_args(argv)
    rows = []
    for fam in a.family or families():
        c = count(fam, a.lora_rank or None)
        rows.append({**c, "plan": plan(c, a.gpus)})
    print(json.dumps(rows, indent=1) if a.json else table(rows, a.gpus))
    return rows


if __name__ == "__main__":
    main()
