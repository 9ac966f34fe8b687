"""SDXL: a diffusion teacher (epsilon prediction, DPM-Solver++) whose students train through the velocity
conversion, as SD's (kinds ddpm / ddpm_velocity / flow).

The conditioning is the pipeline's own: ``encode_prompt`` (both CLIP encoders' penultimate states
concatenated, the second one's pooled projection; with ``force_zeros_for_empty_prompt`` the
unconditional embeddings are zeros, not the empty prompt's) and ``_get_add_time_ids`` (original
size = target size = the output size, crop (0, 0), as the pipeline defaults), carried in a
``Conditioning`` that ``call_unet`` passes as ``added_cond_kwargs`` (Podell et al. 2023, sec. 2.2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from instaflow.flow.conditioning import Conditioning
from instaflow.flow.guidance import uses_uncond
from instaflow.flow.velocity import velocity_field
from instaflow.models import loading
from instaflow.models.families.base import saved_components
from instaflow.models.families.pipeline import PipelineFamily


class SDXLFamily(PipelineFamily):
    """An SDXL pipeline in our time; ``velocity_kind`` None: the diffusion teacher (DPM-Solver++), "ddpm_velocity" /
    "flow": a rectified flow trained from it (Euler, dt = 1/N, through ``instaflow.flow.velocity``). ``vae``
    (loading option): another VAE to decode with, e.g. a local copy of ``madebyollin/sdxl-vae-fp16-fix``."""

    name = "sdxl"
    title = "SDXL"
    pipeline_class = "StableDiffusionXLPipeline"
    conditioning = "CLIP-L + CLIP-G penultimate states, CLIP-G pooled projection, time ids; zeros as uncond"
    options = ("vae",)
    _denoiser = "unet"

    def __init__(self, pipe, velocity_kind: str | None = None) -> None:
        self.pipe, self.velocity_kind = pipe, velocity_kind

    @property
    def kind(self) -> str:
        return self.velocity_kind or "ddpm"

    @classmethod
    def from_pretrained(cls, pretrained: str, vae: str | None = None, velocity_kind: str | None = None) -> "SDXLFamily":
        """Load an SDXL folder or hub id; ``velocity_kind`` defaults to what a folder this framework wrote says."""
        from diffusers import AutoencoderKL

        extra = {} if vae is None else {"vae": loading.from_pretrained(AutoencoderKL, vae, what="SDXL VAE")}
        pipe = cls.load_pipe(pretrained, **extra)
        return cls(pipe, velocity_kind=velocity_kind or saved_components(pretrained).get("kind"))

    @classmethod
    def load(cls, pretrained: str, kind: str | None = None, vae: str | None = None) -> "SDXLFamily":
        if kind not in (None, "ddpm", "ddpm_velocity", "flow"):
            raise ValueError(f"'{pretrained}' is an SDXL pipeline: kind must be null, ddpm (the diffusion teacher), "
                             f"ddpm_velocity or flow (a rectified flow trained from it), got {kind!r}")
        model = cls.from_pretrained(pretrained, vae=vae)  # kind from the folder (a framework export says)
        if kind is not None:
            model.velocity_kind = None if kind == "ddpm" else kind
        return model

    @classmethod
    def student_kind(cls, init: str, parameterization: str) -> str:
        if parameterization not in ("velocity_wrapper", "flow"):
            raise ValueError(f"'{init}' is an SDXL pipeline: use parameterization velocity_wrapper (from the "
                             f"diffusion teacher) or flow (a 2-RF), got {parameterization!r}")
        return "ddpm_velocity" if parameterization == "velocity_wrapper" else "flow"

    @classmethod
    def denoiser_word(cls) -> str:
        return "UNet"

    @classmethod
    def load_student(cls, init: str, kind: str, wrap: Callable | None = None, **settings) -> "SDXLFamily":
        return cls.from_pretrained(init, velocity_kind=kind)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.pipe.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)  # (4, 128, 128) for 1024 px

    def _encode(self, prompts: list[str], guidance: float) -> tuple[Conditioning, Conditioning | None]:
        cfg = uses_uncond(guidance)
        pe, npe, ppe, nppe = self.pipe.encode_prompt(prompts, device=self.device, do_classifier_free_guidance=cfg)
        size = self.latent_shape[1] * self.pipe.vae_scale_factor
        proj = (self.pipe.text_encoder_2.config.projection_dim if self.pipe.text_encoder_2 is not None
                else int(ppe.shape[-1]))
        ids = self.pipe._get_add_time_ids((size, size), (0, 0), (size, size), dtype=pe.dtype,
                                          text_encoder_projection_dim=proj).to(self.device).repeat(len(prompts), 1)
        return Conditioning(pe, ppe, ids), (Conditioning(npe, nppe, ids) if cfg else None)

    def _dropped_cond(self, cond: Conditioning, captions: list[str]) -> Conditioning:
        if self.pipe.config.force_zeros_for_empty_prompt:
            # a dropped caption gets SDXL's unconditional embedding: zeros, not the empty prompt's
            keep = torch.tensor([c != "" for c in captions], device=cond.states.device)
            cond.states = cond.states * keep[:, None, None].to(cond.states.dtype)
            cond.pooled = cond.pooled * keep[:, None].to(cond.pooled.dtype)
        return cond

    def _velocity(self) -> torch.nn.Module:
        """A rectified flow's velocity field (``velocity_kind`` set); the teacher's through the conversion."""
        return velocity_field(self.pipe.unet, self.kind, self.scheduler_config)

    def components_record(self) -> dict:
        return {"kind": self.velocity_kind, "family": self.name}

    @classmethod
    def export_pipeline(cls, model: str, out: Path, prompt: str, unet_from: str | None = None,
                        shown: Path | None = None) -> Path:
        """An SDXL rectified flow as a ``RectifiedFlowPipeline`` folder: SDXL's conditioning, our sampling."""
        from diffusers import DDPMScheduler

        from instaflow.models.export import KIND_TEXT
        from instaflow.models.rf_pipeline import RectifiedFlowPipeline

        sdxl = cls.from_pretrained(model)
        if sdxl.velocity_kind not in KIND_TEXT:
            raise ValueError(f"'{model}' is an SDXL diffusion teacher, not a rectified flow: export the 2-RF or "
                             "one-step folders that reflow and distillation write")
        p = sdxl.pipe
        unet = loading.load_unet(unet_from) if unet_from else p.unet  # a LoRA's base
        pipe = RectifiedFlowPipeline(vae=p.vae, text_encoder=p.text_encoder, text_encoder_2=p.text_encoder_2,
                                     tokenizer=p.tokenizer, tokenizer_2=p.tokenizer_2, unet=unet.eval(),
                                     scheduler=DDPMScheduler.from_config(p.scheduler.config), kind=sdxl.velocity_kind,
                                     force_zeros_for_empty_prompt=p.config.force_zeros_for_empty_prompt)
        out = Path(out)
        pipe.save_pretrained(out)
        return out
