"""``TextToImage``: a loaded text-to-image model (teacher or flow model) with one way to sample it.

Noise from seeds -> text states -> the model's solver -> VAE decoding, in chunks. The stages'
LightningModules sample through it too (``FlowStudent.sampler()``), so images in TensorBoard,
in the quality curves and in the results table come from one code path.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from instaflow.flow.guidance import guided, uses_uncond
from instaflow.flow.noise import latent_shape, seeded_noise
from instaflow.flow.solvers import sample_dpm_solver, sample_euler, time_grid
from instaflow.flow.velocity import velocity_field
from instaflow.models import loading
from instaflow.models.text_encoder import TextEncoder, load_text_encoder


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1], (B, 3, H, W), undoing the VAE's scaling factor."""
    images = vae.decode(latents / vae.config.scaling_factor).sample
    return ((images.float() + 1) / 2).clamp(0, 1)


@dataclass
class TextToImage:
    """UNet + VAE + text encoder + how to integrate.

    ``kind``: "ddpm" (a diffusion teacher: DPM-Solver++), "flow" (a rectified-flow UNet fed
    1000 (1 - t): Euler) or "ddpm_velocity" (a diffusion UNet fine-tuned through the analytic
    velocity conversion: Euler in flow time). ``velocity_module``: a velocity field already built
    over ``unet`` (a training module's own), used instead of building one per call.
    """

    unet: Any
    vae: Any
    text_encoder: TextEncoder
    scheduler_config: dict
    kind: str = "ddpm"
    bf16: bool = False  # bf16 autocast for text encoding, UNet and VAE decoding (CPUs with AVX512-BF16/AMX, GPUs); ODE state fp32
    unet_bf16: bool | None = None  # the UNet's own setting where it differs (None: follow ``bf16``)
    velocity_module: torch.nn.Module | None = None

    @classmethod
    def from_pretrained(cls, pretrained: str, kind: str | None = None, text_cache_size: int = 0) -> "TextToImage":
        """Load any diffusers SD-layout folder or hub id (the embedded teacher is one).

        ``kind`` defaults to what the folder's components file says, else "ddpm" (an SD teacher).
        """
        kind = kind or loading.component_sources(pretrained)["kind"]
        unet = loading.load_unet(pretrained).eval().requires_grad_(False)
        return cls(unet=unet, vae=loading.load_vae(pretrained),
                   text_encoder=load_text_encoder(pretrained, cache_size=text_cache_size),
                   scheduler_config=loading.load_scheduler_config(pretrained), kind=kind)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return latent_shape(self.unet.config)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device: torch.device | str) -> "TextToImage":
        """Move every network (UNet, VAE, text encoder, velocity module) to ``device``; returns self."""
        for net in (self.unet, self.vae, self.text_encoder, self.velocity_module):
            if net is not None:
                net.to(device)
        return self

    def _autocast(self, enabled: bool):
        # disabled means "leave the caller's autocast alone", not "switch autocast off"
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()

    @torch.no_grad()
    def encode(self, prompts: list[str], guidance: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text states (cond, uncond) of ``prompts``; uncond (the empty caption) only under guidance (w != 1)."""
        with self._autocast(self.bf16):
            cond = self.text_encoder(prompts)  # (B, L, D)
            uncond = self.text_encoder.empty(len(prompts)) if uses_uncond(guidance) else None
        return cond, uncond

    @torch.no_grad()
    def sample_latents(self, prompts: list[str], steps: int, guidance: float, seeds: list[int] | None = None,
                       x0: torch.Tensor | None = None, states: tuple | None = None,
                       path: list | None = None) -> torch.Tensor:
        """x1 latents for ``prompts`` from seeded noise x0 (one seed per prompt); ``states`` =
        precomputed (cond, uncond) text states, to time the UNet alone; ``path`` (optional) receives
        the solver's states (t, x_t) in flow time, x0 first, for straightness."""
        if x0 is None:
            x0 = seeded_noise(seeds, self.latent_shape)
        x0 = x0.to(self.device)
        cond, uncond = self.encode(prompts, guidance) if states is None else states
        with self._autocast(self.bf16 if self.unet_bf16 is None else self.unet_bf16):
            return self._solve(x0, cond, uncond, steps, guidance, path).float()

    def _solve(self, x0, cond, uncond, steps: int, guidance: float, path: list | None = None) -> torch.Tensor:
        if self.kind == "ddpm":
            return sample_dpm_solver(self.unet, self.scheduler_config, x0, cond, uncond, guidance, steps, path=path)
        return sample_euler(guided(self.velocity(), cond, uncond, guidance), x0, time_grid(steps), path)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, h, w) -> images (B, 3, H, W) in [0, 1]."""
        with self._autocast(self.bf16):
            return decode_latents(self.vae, latents).float()

    def velocity(self) -> torch.nn.Module:
        """The model as a velocity field v(x_t, t, states) in flow time, whatever its parameterization."""
        if self.velocity_module is not None:
            return self.velocity_module
        return velocity_field(self.unet, self.kind, self.scheduler_config)

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
