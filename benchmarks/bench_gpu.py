"""GPU figures for an SD-1.5-sized model (random weights; the real configs are written out below).

    python -m benchmarks.bench_gpu                    # on a CUDA machine; ~3-5 min on one A100/H100
    python -m benchmarks.bench_gpu --peak-tflops 312  # MFU against a peak you name (default: known cards)
    python -m benchmarks.bench_gpu --smoke            # the same code on CPU with a tiny config (no figures)

1. reflow training step at 64x64x4 latents (512 px), batch ``--batch``: step time, peak memory and
   MFU for (a) fp32 weights + bf16 autocast, (b) FSDP2 on 1 GPU with the bf16 MixedPrecisionPolicy
   (``instaflow.models.sharding.shard_unet``, the code sharded runs use), (c) (b) + activation
   checkpointing. FLOPs of one step are counted with ``torch.utils.flop_counter``;
2. coupling throughput: 25-step DPM-Solver++ with guidance (``solvers.sample_diffusion_teacher`` over the guided velocity), bf16;
3. one-step 512 px latency at batch 1: text encoder, UNet, VAE decode (bf16).
Without CUDA it stops at once and says so (``--smoke`` excepted).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from instaflow.evaluation.throughput import peak_flops_for
from instaflow.flow.diffusion import SD_SCHEDULE

# runwayml/stable-diffusion-v1-5 unet/config.json (860M parameters)
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True,
    "freq_shift": 0, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                          "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8,
}
# vae/config.json (84M parameters)
SD15_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 512, "layers_per_block": 2,
    "block_out_channels": [128, 256, 512, 512], "act_fn": "silu", "norm_num_groups": 32, "scaling_factor": 0.18215,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# text_encoder/config.json (CLIP ViT-L/14 text tower, 123M parameters)
SD15_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768}

TINY_UNET = {**SD15_UNET, "sample_size": 8, "block_out_channels": [32, 64, 64, 64], "layers_per_block": 1,
             "norm_num_groups": 8, "cross_attention_dim": 32, "attention_head_dim": 4}
TINY_VAE = {**SD15_VAE, "sample_size": 64, "block_out_channels": [8, 16, 16, 16], "layers_per_block": 1,
            "norm_num_groups": 8}
TINY_TEXT = {**SD15_TEXT, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "projection_dim": 32}

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def build_unet(cfgs: dict, device: torch.device):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**cfgs["unet"]).to(device)


def build(cfgs: dict, device: torch.device):
    """UNet, VAE and CLIP text encoder with random weights."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(**cfgs["vae"]).to(device).eval().requires_grad_(False)
    text = CLIPTextModel(CLIPTextConfig(**cfgs["text"])).to(device).eval().requires_grad_(False)
    return build_unet(cfgs, device), vae, text


def reflow_step_fn(unet, batch: int, size: int, states_dim: int, device, autocast: bool, opt):
    from instaflow.flow.losses import l2_loss
    from instaflow.flow.paths import interpolate, velocity_target
    from instaflow.flow.velocity import RectifiedFlowVelocity

    g = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(batch, 4, size, size, generator=g).to(device)  # (B, 4, 64, 64)
    x1 = torch.randn(batch, 4, size, size, generator=g).to(device)
    states = torch.randn(batch, 77, states_dim, generator=g).to(device)  # (B, 77, 768)
    velocity = RectifiedFlowVelocity(unet)

    def step():
        t = torch.rand(batch, generator=g).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            v_pred = velocity(interpolate(x0, x1, t), t, states)
        loss = l2_loss(v_pred.float(), velocity_target(x0, x1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def bench_reflow(cfgs, device, batch, iters, peak_tflops, variant: str, model_flops: float | None = None) -> dict:
    """One variant's median step; MFU counts ``model_flops`` (no recomputation) when given."""
    from instaflow.models import sharding

    unet = build_unet(cfgs, device).train()
    if variant in ("fsdp2_bf16", "fsdp2_bf16_ac"):
        from torch.distributed.device_mesh import init_device_mesh

        if variant.endswith("_ac"):
            unet.enable_gradient_checkpointing()
        mesh = init_device_mesh(device.type, (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
        sharding.shard_unet(unet, mesh, "bf16")
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    step = reflow_step_fn(unet, batch, cfgs["unet"]["sample_size"], cfgs["unet"]["cross_attention_dim"], device,
                          autocast=variant == "fp32_weights_bf16_autocast", opt=opt)
    step()  # optimizer state exists before memory is counted
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    flops = count_flops(step)
    times = measure(step, device, warmup=2, iters=iters)
    t = statistics.median(times)
    out = {"variant": variant, "batch": batch, "step_s": t, "steps_per_s": 1 / t, "tflops_per_step": flops / 1e12,
           "achieved_tflops": flops / t / 1e12,
           "mfu": (model_flops or flops) / t / 1e12 / peak_tflops if peak_tflops else None,
           "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    del unet, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def bench_couplings(cfgs, device, batch, steps, guidance, iters) -> dict:
    from instaflow.flow.guidance import guided
    from instaflow.flow.solvers import sample_diffusion_teacher
    from instaflow.flow.velocity import velocity_field

    unet = build_unet(cfgs, device).eval().requires_grad_(False)
    size, dim = cfgs["unet"]["sample_size"], cfgs["unet"]["cross_attention_dim"]
    g = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(batch, 4, size, size, generator=g).to(device)
    cond, uncond = (torch.randn(batch, 77, dim, generator=g).to(device) for _ in range(2))

    @torch.no_grad()
    def solve():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return sample_diffusion_teacher(guided(velocity_field(unet, "ddpm", SD_SCHEDULE), cond, uncond, guidance),
                                            x0, SD_SCHEDULE, steps)

    t = statistics.median(measure(solve, device, warmup=1, iters=iters))
    return {"batch": batch, "steps": steps, "guidance": guidance, "seconds_per_batch": t, "couplings_per_s": batch / t}


def bench_one_step(cfgs, device, iters) -> dict:
    unet, vae, text = build(cfgs, device)
    unet.eval().requires_grad_(False)
    size = cfgs["unet"]["sample_size"]
    ids = torch.randint(0, cfgs["text"]["vocab_size"], (1, 77), device=device)
    x0 = torch.randn(1, 4, size, size, device=device)
    t = torch.full((1,), 1000.0, device=device)  # a rectified-flow UNet at t = 0 gets 1000 (1 - t)
    parts = {}

    @torch.no_grad()
    def run(part: str):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            states = text(ids)[0] if part in ("text", "all") else torch.randn(1, 77, cfgs["text"]["hidden_size"],
                                                                              device=device)
            x1 = x0 + unet(x0, t, encoder_hidden_states=states).sample if part in ("unet", "all") else x0
            if part in ("vae", "all"):
                vae.decode(x1 / vae.config.scaling_factor)

    for part in ("text", "unet", "vae", "all"):
        parts[f"{part}_ms"] = 1e3 * statistics.median(measure(lambda: run(part), device, warmup=3, iters=iters))
    return parts


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16, help="reflow training batch per GPU (64x64x4 latents)")
    p.add_argument("--coupling-batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the card for MFU")
    p.add_argument("--smoke", action="store_true", help="tiny configs on CPU: checks the code, measures nothing")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results_gpu.json; none with --smoke)")
    args = p.parse_args(argv)

    if args.smoke:
        device, cfgs = torch.device("cpu"), {"unet": TINY_UNET, "vae": TINY_VAE, "text": TINY_TEXT}
        args.batch, args.coupling_batch, args.iters = 2, 2, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_gpu needs a CUDA GPU (torch.cuda.is_available() is False on this machine): run it "
                             "on a GPU node, or `python -m benchmarks.bench_gpu --smoke` to check the code on CPU")
        device, cfgs = torch.device("cuda", 0), {"unet": SD15_UNET, "vae": SD15_VAE, "text": SD15_TEXT}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"
    known = peak_flops_for(device)  # dense bf16 datasheet figure of this card (None when unknown)
    peak = args.peak_tflops or (known / 1e12 if known else None)

    import torch.distributed as dist

    if not dist.is_initialized():  # FSDP2 on one device still needs a process group
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    res = {"device": name, "torch": torch.__version__, "peak_bf16_tflops": peak, "reflow": []}
    try:
        for variant in ("fp32_weights_bf16_autocast", "fsdp2_bf16", "fsdp2_bf16_ac"):
            model_flops = res["reflow"][0]["tflops_per_step"] * 1e12 if res["reflow"] else None
            r = bench_reflow(cfgs, device, args.batch, args.iters, peak, variant, model_flops)
            res["reflow"].append(r)
            print(json.dumps(r), flush=True)
        res["couplings"] = bench_couplings(cfgs, device, args.coupling_batch, 25, 5.0, max(1, args.iters // 3))
        print(json.dumps(res["couplings"]), flush=True)
        res["one_step_512px"] = bench_one_step(cfgs, device, args.iters)
        print(json.dumps(res["one_step_512px"]), flush=True)
    finally:
        dist.destroy_process_group()
    out = args.out or (None if args.smoke else str(Path(__file__).with_name("results_gpu.json")))
    if out:
        Path(out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
