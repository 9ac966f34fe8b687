"""A loaded text-to-image model (teacher or flow model) with one ``sample`` for all of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lightning_modules import flows, models, sampling


@dataclass
class TextToImage:
    """UNet + VAE + text encoder + how to integrate.

    ``kind``: "ddpm" (a diffusion teacher: DPM-Solver++), "flow" (a rectified-flow UNet fed
    1000 (1 - t): Euler) or "ddpm_velocity" (a diffusion UNet fine-tuned through the analytic
    velocity conversion: Euler in flow time).
    """

    unet: Any
    vae: Any
    text_encoder: models.TextEncoder
    scheduler_config: dict
    kind: str = "ddpm"
    bf16: bool = False  # bf16 autocast for the UNet (CPUs with AVX512-BF16/AMX and GPUs); latents stay fp32

    @classmethod
    def from_pretrained(cls, pretrained: str, kind: str | None = None, text_cache_size: int = 0) -> "TextToImage":
        """Load any diffusers SD-layout folder or hub id (the embedded teacher is one).

        ``kind`` defaults to what the folder's components file says, else "ddpm" (an SD teacher).
        """
        kind = kind or models.component_sources(pretrained)["kind"]
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
                       x0: torch.Tensor | None = None, states: tuple | None = None) -> torch.Tensor:
        """x1 latents for ``prompts`` from seeded noise x0 (one seed per prompt); ``states`` =
        precomputed (cond, uncond) text states, to time the UNet alone."""
        if x0 is None:
            x0 = sampling.seeded_noise(seeds, self.latent_shape)
        device = next(self.unet.parameters()).device
        x0 = x0.to(device)
        if states is None:
            cond = self.text_encoder(prompts)
            uncond = self.text_encoder.empty(len(prompts)) if guidance > 1.0 else None
        else:
            cond, uncond = states
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self._solve(x0, cond, uncond, steps, guidance).float()

    def _solve(self, x0, cond, uncond, steps: int, guidance: float) -> torch.Tensor:
        if self.kind == "ddpm":
            return sampling.sample_dpm_solver(self.unet, self.scheduler_config, x0, cond, uncond, guidance, steps)
        return flows.sample_euler(flows.guided(self.velocity(), cond, uncond, guidance), x0, flows.time_grid(steps))

    def velocity(self) -> torch.nn.Module:
        """The model as a velocity field v(x_t, t, states) in flow time, whatever its parameterization."""
        if self.kind == "flow":
            return models.RectifiedFlowVelocity(self.unet)
        alphas = models.alphas_cumprod(self.scheduler_config)
        return models.DiffusionVelocity(self.unet, alphas, self.scheduler_config.get("prediction_type", "epsilon"))

    @torch.no_grad()
    def sample_images(self, prompts: list[str], steps: int, guidance: float, seeds: list[int],
                      batch_size: int = 256) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1], prompt i from noise seed ``seeds[i]``, in chunks of ``batch_size``."""
        return torch.cat([sampling.decode(self.vae, self.sample_latents(prompts[i:i + batch_size], steps, guidance,
                                                                         seeds[i:i + batch_size]))
                          for i in range(0, len(prompts), batch_size)])

    @torch.no_grad()
    def sample(self, prompts: list[str], steps: int = 25, guidance: float = 1.0, seed: int = 0,
               batch_size: int = 256) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1]; prompt i uses noise seed ``seed + i``."""
        return self.sample_images(prompts, steps, guidance, list(range(seed, seed + len(prompts))), batch_size)
