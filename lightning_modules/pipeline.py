"""A loaded text-to-image model (teacher or flow model) with one ``sample`` for all of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lightning_modules import flows, models, sampling


@dataclass
class TextToImage:
    """UNet + VAE + text encoder + how to integrate: ``kind`` is "ddpm" (DPM-Solver++) or "flow" (Euler)."""

    unet: Any
    vae: Any
    text_encoder: models.TextEncoder
    scheduler_config: dict
    kind: str = "ddpm"

    @classmethod
    def from_pretrained(cls, pretrained: str, kind: str = "ddpm", text_cache_size: int = 0) -> "TextToImage":
        """Load any diffusers SD-layout folder or hub id (the embedded teacher is one)."""
        unet = models.load_unet(pretrained).eval().requires_grad_(False)
        return cls(unet=unet, vae=models.load_vae(pretrained),
                   text_encoder=models.load_text_encoder(pretrained, cache_size=text_cache_size),
                   scheduler_config=models.load_scheduler_config(pretrained), kind=kind)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.unet.config.sample_size
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        return (self.unet.config.in_channels, h, w)

    @torch.no_grad()
    def sample_latents(self, prompts: list[str], steps: int, guidance: float, seeds: list[int] | None = None,
                       x0: torch.Tensor | None = None) -> torch.Tensor:
        """x1 latents for ``prompts`` from seeded noise x0 (one seed per prompt)."""
        if x0 is None:
            x0 = sampling.seeded_noise(seeds, self.latent_shape)
        device = next(self.unet.parameters()).device
        x0 = x0.to(device)
        cond = self.text_encoder(prompts)
        uncond = self.text_encoder([""] * len(prompts)) if guidance > 1.0 else None
        if self.kind == "ddpm":
            return sampling.sample_dpm_solver(self.unet, self.scheduler_config, x0, cond, uncond, guidance, steps)
        v = models.RectifiedFlowVelocity(self.unet)
        return flows.sample_euler(flows.guided(v, cond, uncond, guidance), x0, flows.time_grid(steps))

    @torch.no_grad()
    def sample(self, prompts: list[str], steps: int = 25, guidance: float = 1.0, seed: int = 0,
               batch_size: int = 256) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1]; prompt i uses noise seed ``seed + i``."""
        out = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            seeds = list(range(seed + i, seed + i + len(chunk)))
            out.append(sampling.decode(self.vae, self.sample_latents(chunk, steps, guidance, seeds)))
        return torch.cat(out)
