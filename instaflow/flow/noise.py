"""Seeded noise x0: any machine regenerates a coupling's noise from its seed."""

from __future__ import annotations

import zlib
from typing import Iterable

import torch


def seeded_noise(seeds: Iterable[int], shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
    """x0 ~ N(0, I), one CPU generator per seed: any machine regenerates the same noise from the seed."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=dtype)
                        for s in seeds])  # (B, *shape)


def sample_seed(key: str, base_seed: int) -> int:
    """A per-sample noise seed from the sample key: stable across machines, ranks and reruns."""
    return zlib.crc32(f"{base_seed}/{key}".encode()) & 0x7FFFFFFF


def latent_shape(unet_config) -> tuple[int, int, int]:
    """(C, h, w) of a UNet's latents from its config (``sample_size`` an int or (h, w))."""
    s = unet_config["sample_size"] if isinstance(unet_config, dict) else unet_config.sample_size
    c = unet_config["in_channels"] if isinstance(unet_config, dict) else unet_config.in_channels
    h, w = (s, s) if isinstance(s, int) else tuple(s)
    return (int(c), int(h), int(w))
