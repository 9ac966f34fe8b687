"""SD 1.x/2.x (and the embedded world's SD-layout teacher): UNet + VAE + one text encoder.

``kind``: "ddpm" (a diffusion teacher: DPM-Solver++), "flow" (a rectified-flow UNet fed 1000 (1 - t): Euler)
or "ddpm_velocity" (a diffusion UNet fine-tuned through the analytic velocity conversion: Euler in flow
time). The conditioning is the text encoder's token states (B, L, D), a bare tensor; couplings may store
them (``store_text_states``). The stages sample, train and export SD through this class, and so do the
evaluation and tools (``instaflow.models.sampler.TextToImage`` is this class).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from instaflow.flow.guidance import keep_mask, uses_uncond
from instaflow.flow.noise import latent_shape
from instaflow.flow.velocity import KINDS, velocity_field
from instaflow.models import loading
from instaflow.models.families.base import FamilyBase
from instaflow.models.text_encoder import TextEncoder, load_text_encoder


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1], (B, 3, H, W), undoing the VAE's scaling factor."""
    images = vae.decode(latents / vae.config.scaling_factor).sample
    return ((images.float() + 1) / 2).clamp(0, 1)


@dataclass
class SDFamily(FamilyBase):
    """UNet + VAE + text encoder + how to integrate (``kind``, module docstring).

    ``velocity_module``: a velocity field already built over ``unet`` (a training module's own), used
    instead of building one per call. ``components``: where the text encoder comes from (a package
    reference is kept as a reference when saving).
    """

    name = "sd"
    title = "SD"
    pipeline_class = "StableDiffusionPipeline"
    conditioning = "text encoder token states"
    options = ("text_cache_size", "text_cache_mb")
    sample_batch_size = 256

    unet: Any
    vae: Any
    text_encoder: TextEncoder
    scheduler_config: dict
    kind: str = "ddpm"
    bf16: bool = False  # bf16 autocast for text encoding, UNet and VAE decoding (CPUs with AVX512-BF16/AMX, GPUs); ODE state fp32
    unet_bf16: bool | None = None  # the UNet's own setting where it differs (None: follow ``bf16``)
    velocity_module: torch.nn.Module | None = None
    components: dict | None = None

    @classmethod
    def from_pretrained(cls, pretrained: str, kind: str | None = None, text_cache_size: int = 0,
                        text_cache_mb: float | None = None) -> "SDFamily":
        """Load any diffusers SD-layout folder or hub id (the embedded teacher is one).

        ``kind`` defaults to what the folder's components file says, else "ddpm" (an SD teacher).
        """
        components = loading.component_sources(pretrained)
        kind = kind or components["kind"]
        unet = loading.load_unet(pretrained).eval().requires_grad_(False)
        cache = dict(cache_size=text_cache_size) if text_cache_mb is None else dict(cache_mb=text_cache_mb)
        return cls(unet=unet, vae=loading.load_vae(pretrained), text_encoder=load_text_encoder(pretrained, **cache),
                   scheduler_config=loading.load_scheduler_config(pretrained), kind=kind, components=components)

    @classmethod
    def load(cls, pretrained: str, kind: str | None = None, **options) -> "SDFamily":
        if kind is not None and kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS} for '{pretrained}' (an SD-layout folder), got {kind!r}")
        return cls.from_pretrained(pretrained, kind=kind, **options)

    @classmethod
    def student_kind(cls, init: str, parameterization: str) -> str:
        # raw and flow read the UNet as a rectified flow; velocity_wrapper through the conversion
        return "ddpm_velocity" if parameterization == "velocity_wrapper" else "flow"

    @classmethod
    def stacks(cls) -> bool:
        return True

    @classmethod
    def denoiser_word(cls) -> str:
        return "UNet"

    @classmethod
    def load_student(cls, init: str, kind: str, wrap: Callable | None = None, text_cache_mb: float = 0,
                     **settings) -> "SDFamily":
        vae = loading.load_vae(init)
        text_encoder = load_text_encoder(init, cache_mb=text_cache_mb)
        scheduler_config = loading.load_scheduler_config(init)
        components = loading.component_sources(init)
        unet = loading.load_unet(init)
        return cls(unet=wrap(unet) if wrap is not None else unet, vae=vae, text_encoder=text_encoder,
                   scheduler_config=scheduler_config, kind=kind, components=components)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return latent_shape(self.unet.config)

    def to(self, device: torch.device | str) -> "SDFamily":
        for net in (self.unet, self.vae, self.text_encoder, self.velocity_module):
            if net is not None:
                net.to(device)
        return self

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        return {"vae": self.vae, "text_encoder": self.text_encoder}

    def _encode(self, prompts: list[str], guidance: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text states (cond, uncond) of ``prompts``; uncond (the empty caption) only under guidance (w != 1)."""
        cond = self.text_encoder(prompts)  # (B, L, D)
        uncond = self.text_encoder.empty(len(prompts)) if uses_uncond(guidance) else None
        return cond, uncond

    def check_stored_states(self) -> None:
        return None  # token states alone: the couplings may carry them

    def stored_states(self, states: torch.Tensor, dropout: float, generator: torch.Generator) -> torch.Tensor:
        """Stored token states (B, L, D) as training conditioning; a dropped caption gets the empty caption's states
        (the same draw as ``drop_captions``, so both paths train on the same conditioning up to float16 rounding)."""
        states = states.to(self.device, torch.float32)  # (B, L, D)
        want = (self.text_encoder.max_length, self.text_encoder.hidden_size)
        if tuple(states.shape[1:]) != want:
            raise ValueError(f"the couplings' stored text states are {tuple(states.shape[1:])} per caption, this "
                             f"model's text encoder gives {want}: they come from another text encoder or max_length; "
                             "regenerate the couplings with this model's encoder, or without store_text_states")
        if dropout:
            keep = keep_mask(states.shape[0], dropout, generator)
            states = torch.where(keep.to(states.device)[:, None, None], states,
                                 self.text_encoder.empty(states.shape[0]).to(states.dtype))
        return states

    def check_sharding(self) -> None:
        return None  # the per-block FSDP2 sharding is written for SD UNets (instaflow.models.sharding)

    def _velocity(self) -> torch.nn.Module:
        return velocity_field(self.unet, self.kind, self.scheduler_config)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, h, w) -> images (B, 3, H, W) in [0, 1]."""
        with self._autocast(self.bf16):
            return decode_latents(self.vae, latents).float()

    def save(self, dirpath: str | Path, denoiser: torch.nn.Module | None = None) -> Path:
        """An SD pipeline folder (``saving.save_pipeline``): the embedded text encoder stays a package reference."""
        from instaflow.models.saving import save_pipeline

        te = (self.components or {}).get("text_encoder")
        package = te if isinstance(te, str) and te.startswith(loading.PACKAGE_PREFIX) else None
        return save_pipeline(dirpath, self.unet if denoiser is None else denoiser, self.vae, self.scheduler_config,
                             text_encoder=package, max_length=self.text_encoder.max_length,
                             text_encoder_module=self.text_encoder, kind=self.kind)

    @classmethod
    def export_pipeline(cls, model: str, out: Path, prompt: str, unet_from: str | None = None,
                        shown: Path | None = None) -> Path:
        """A ``RectifiedFlowPipeline`` folder (SD conditioning, our sampling) with its README."""
        from diffusers import DDPMScheduler

        from instaflow.models.export import KIND_TEXT, README
        from instaflow.models.rf_pipeline import RectifiedFlowPipeline
        from instaflow.state import atomic_write_text

        kind = loading.component_sources(model)["kind"]
        if kind not in KIND_TEXT:
            raise ValueError(
                f"'{model}' is a diffusion teacher (kind {kind!r}), not a rectified flow: export the 2-RF or one-step "
                f"model folders that reflow and distillation write (kind flow or ddpm_velocity); a teacher "
                f"already loads as a diffusers StableDiffusionPipeline.")
        text = load_text_encoder(model)  # resolves package:... references to the real weights
        pipe = RectifiedFlowPipeline(
            vae=loading.load_vae(model), text_encoder=text.model, tokenizer=text.tokenizer,
            unet=loading.load_unet(unet_from or model).eval(),
            scheduler=loading.from_pretrained(DDPMScheduler, model, "scheduler", what="scheduler"),
            kind=kind, max_length=text.max_length)
        out = Path(out)
        shown = shown or out
        pipe.save_pretrained(out)
        size = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        atomic_write_text(out / "README.md", README.format(
            name=shown.name, model=model, kind=kind, kind_text=KIND_TEXT[kind], out=shown, prompt=prompt,
            text_class=type(text.model).__name__, max_length=text.max_length, size=size))
        return out
