"""What a training step costs: peak FLOP/s per device, peak memory, FLOPs of a UNet forward (for MFU).

Shared by the ``Throughput`` callback and the GPU benchmark (benchmarks/bench_gpu.py).
"""

from __future__ import annotations

import resource
import sys

import torch

from instaflow.flow.noise import latent_shape


# Dense bf16 tensor-core peak per device in FLOP/s, from the vendors' datasheets (no sparsity).
PEAK_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
}
# A CPU has no single datasheet figure: threads x 2.5 GHz x 32 fp32 FLOP per cycle (two AVX2 FMA units).
# MFU on CPU is therefore a rough figure, useful to compare runs on the same machine, not across machines.
CPU_FLOPS_PER_THREAD = 2.5e9 * 32


def peak_flops_for(device: torch.device) -> float | None:
    """Peak FLOP/s of ``device`` from PEAK_FLOPS (GPU) or the CPU rule; None for an unknown GPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return torch.get_num_threads() * CPU_FLOPS_PER_THREAD


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max_memory_allocated on a GPU, the process's peak resident set size on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def unet_forward_flops(unet: torch.nn.Module, tokens: int, device: torch.device) -> int:
    """FLOPs of one forward pass of a diffusers UNet2DConditionModel on one sample (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = unet.config
    dtype = next(unet.parameters()).dtype
    x_t = torch.zeros(1, *latent_shape(cfg), device=device, dtype=dtype)  # (1, C, h, w); values do not change FLOPs
    states = torch.zeros(1, tokens, cfg.cross_attention_dim, device=device, dtype=dtype)  # (1, L, D)
    timestep = torch.tensor([500.0], device=device)
    # fork the RNG: a dropout layer in this forward must not shift the training run's random stream
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), \
            FlopCounterMode(display=False) as counter:
        unet(x_t, timestep, encoder_hidden_states=states)
    return counter.get_total_flops()


def batch_size_of(batch) -> int:
    """Samples in a batch: the first dimension of its first tensor (dicts, lists and tuples searched in order)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else []
    for item in items:
        if isinstance(item, torch.Tensor) and item.ndim > 0:
            return item.shape[0]
    raise ValueError(f"cannot find a tensor in the batch ({type(batch).__name__}) to count its samples")
