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
    bf16: bool = False  # bf16 autocast for text encoding, UNet and VAE decoding (CPUs with AVX512-BF16/AMX, GPUs); ODE state fp32
    unet_bf16: bool | None = None  # the UNet's own setting where it differs (None: follow ``bf16``)

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

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def _autocast(self, enabled: bool):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    @torch.no_grad()
    def encode(self, prompts: list[str], guidance: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text states (cond, uncond) of ``prompts``; uncond (the empty caption) only under guidance."""
        with self._autocast(self.bf16):
            cond = self.text_encoder(prompts)  # (B, L, D)
            uncond = self.text_encoder.empty(len(prompts)) if guidance > 1.0 else None
        return cond, uncond

    @torch.no_grad()
    def sample_latents(self, prompts: list[str], steps: int, guidance: float, seeds: list[int] | None = None,
                       x0: torch.Tensor | None = None, states: tuple | None = None,
                       path: list | None = None) -> torch.Tensor:
        """x1 latents for ``prompts`` from seeded noise x0 (one seed per prompt); ``states`` =
        precomputed (cond, uncond) text states, to time the UNet alone; ``path`` (optional) receives
        the solver's states (t, x_t) in flow time, x0 first, for straightness."""
        if x0 is None:
            x0 = sampling.seeded_noise(seeds, self.latent_shape)
        x0 = x0.to(self.device)
        cond, uncond = self.encode(prompts, guidance) if states is None else states
        with self._autocast(self.bf16 if self.unet_bf16 is None else self.unet_bf16):
            return self._solve(x0, cond, uncond, steps, guidance, path).float()

    def _solve(self, x0, cond, uncond, steps: int, guidance: float, path: list | None = None) -> torch.Tensor:
        if self.kind == "ddpm":
            if path is not None:
                path.append((0.0, x0))
            return sampling.sample_dpm_solver(self.unet, self.scheduler_config, x0, cond, uncond, guidance, steps,
                                              path=path)
        traj: list | None = [] if path is not None else None
        x1 = flows.sample_euler(flows.guided(self.velocity(), cond, uncond, guidance), x0, flows.time_grid(steps), traj)
        if path is not None:  # Euler's states: x0 + the running sum of dt * v
            x = x0
            path.append((0.0, x0))
            for t, dt, v in traj:
                x = x + dt * v
                path.append((t + dt, x))
        return x1

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, h, w) -> images (B, 3, H, W) in [0, 1]."""
        with self._autocast(self.bf16):
            return sampling.decode(self.vae, latents).float()

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
        return torch.cat([self.decode(self.sample_latents(prompts[i:i + batch_size], steps, guidance,
                                                          seeds[i:i + batch_size]))
                          for i in range(0, len(prompts), batch_size)])

    @torch.no_grad()
    def sample(self, prompts: list[str], steps: int = 25, guidance: float = 1.0, seed: int = 0,
               batch_size: int = 256) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1]; prompt i uses noise seed ``seed + i``."""
        return self.sample_images(prompts, steps, guidance, list(range(seed, seed + len(prompts))), batch_size)
