"""SANA (Xie et al. 2024, "SANA: Efficient High-Resolution Image Synthesis with Linear Diffusion Transformers"):
a Gemma-2 text encoder, a linear-attention transformer and a 32x deep-compression autoencoder (DC-AE).

Why SANA and not PixArt-Sigma as the fifth family: SANA is trained by flow matching (the transformer
predicts noise - data at timestep sigma * 1000, Xie et al. sec. 2.3), so it reads as a velocity field in
our time by the same conversion as SD3 (``flow_matching.fm_to_velocity``) and its students stay SANA
folders that plain ``SanaPipeline`` samples with uniform sigmas: no DPM-Solver teacher path, no learned-
sigma split at training time and no ``RectifiedFlowPipeline`` export, which an epsilon-prediction PixArt
would need. Its tiny random configuration builds offline (a Gemma tokenizer is a vocab without merges).

What the family needed beyond SD3's shape: the text attention mask (Gemma pads to 300 tokens and the
transformer's cross-attention must not see the padding), carried in ``SanaConditioning`` (a
``Conditioning`` with ``mask``; ``cat`` keeps it, so guidance and the coupling stage pass it along
unchanged); the prompt as the pipeline encodes it (its ``complex_human_instruction`` prepended, then
the first token and the last 299 kept); and the unconditional embedding, which is the empty prompt
*without* the instruction, so a dropped caption trains on exactly what guidance subtracts.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from instaflow.flow.conditioning import Conditioning
from instaflow.flow.flow_matching import flow_matching_time_grid, fm_timestep, fm_to_velocity
from instaflow.flow.guidance import uses_uncond
from instaflow.flow.solvers import time_grid
from instaflow.models import loading
from instaflow.models.families.base import FamilyBase, absent_components, saved_components
from instaflow.state import atomic_write_json

Tensor = torch.Tensor


@dataclass
class SanaConditioning(Conditioning):
    """Gemma token states (B, L, D) and their attention mask (B, L) (1 = a token, 0 = padding)."""

    mask: Tensor | None = None

    @staticmethod
    def cat(items: list["SanaConditioning"]) -> "SanaConditioning":
        return SanaConditioning(torch.cat([c.states for c in items]), mask=torch.cat([c.mask for c in items]))

    def to(self, dtype: torch.dtype) -> "SanaConditioning":
        return SanaConditioning(self.states.to(dtype), mask=self.mask)  # the mask stays integer


class SanaVelocity(torch.nn.Module):
    """A SANA transformer as v(x_t, t, cond) in our time: timestep sigma * 1000 * ``timestep_scale`` (as
    ``SanaPipeline`` feeds it), the text mask as ``encoder_attention_mask``, v = -output; a learned-sigma
    checkpoint (twice the output channels) keeps its first half, as the pipeline does."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, x_t: Tensor, t: Tensor, cond: SanaConditioning) -> Tensor:
        c = self.transformer.config
        scale = 1000.0 * c.get("timestep_scale", 1.0)
        out = self.transformer(x_t, encoder_hidden_states=cond.states.to(x_t.dtype),
                               encoder_attention_mask=cond.mask, timestep=fm_timestep(t, scale).to(x_t.dtype),
                               return_dict=False)[0]  # (B, C or 2C, h, w)
        if c.out_channels // 2 == c.in_channels:
            out = out.chunk(2, dim=1)[0]
        return fm_to_velocity(out)


def pipeline_instruction() -> list[str]:
    """The ``complex_human_instruction`` ``SanaPipeline.__call__`` prepends by default (read from the installed diffusers)."""
    from diffusers import SanaPipeline

    return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


class SanaFamily(FamilyBase):
    """A SANA pipeline as a flow-matching teacher, or a rectified flow trained from one (module docstring).

    ``uniform``: Euler with dt = 1/N (our flows) instead of the scheduler's shifted sigmas; ``instruction``:
    the text prepended to each prompt before encoding (None: the pipeline's default; [] for none).
    """

    name = "sana"
    title = "SANA"
    pipeline_class = "SanaPipeline"
    conditioning = "Gemma-2 token states of the instruction-prefixed prompt, with their attention mask"

    def __init__(self, pipe, uniform: bool = False, max_sequence_length: int = 300,
                 instruction: list[str] | None = None) -> None:
        self.pipe, self.uniform, self.max_sequence_length = pipe, uniform, max_sequence_length
        self.instruction = pipeline_instruction() if instruction is None else instruction

    # -- loading -------------------------------------------------------------------------------------------
    @classmethod
    def _pipeline(cls, pretrained: str):
        from diffusers import SanaPipeline

        pipe = loading.from_pretrained(SanaPipeline, pretrained, what="SANA pipeline", **absent_components(pretrained))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @classmethod
    def load(cls, pretrained: str, kind: str | None = None, **options) -> "SanaFamily":
        """A SANA folder or hub id; a folder this framework wrote samples uniformly (its components file says)."""
        if kind not in (None, "flow_matching"):
            raise ValueError(f"'{pretrained}' is a SANA pipeline (a flow-matching model): kind must be null or "
                             f"flow_matching, got {kind!r}")
        return cls(cls._pipeline(pretrained), uniform=saved_components(pretrained).get("sampling") == "uniform")

    @classmethod
    def student_kind(cls, init: str, parameterization: str) -> str:
        if parameterization != "flow":
            raise ValueError(f"'{init}' is a SANA pipeline, a flow-matching model already: use parameterization "
                             f"flow (got {parameterization!r})")
        return "flow_matching"

    @classmethod
    def load_student(cls, init: str, kind: str, wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                     **settings) -> "SanaFamily":
        """The pipeline of ``init`` with its transformer trainable (frozen Gemma and DC-AE); our flows: dt = 1/N."""
        family = cls(cls._pipeline(init), uniform=True)
        family.pipe.text_encoder.requires_grad_(False)
        family.pipe.vae.requires_grad_(False)
        if wrap is not None:
            family.pipe.transformer = wrap(family.pipe.transformer)
        return family

    # -- what it is ----------------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return "flow_matching"

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def scheduler_config(self) -> dict:
        return dict(self.pipe.scheduler.config)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.pipe.transformer.config
        return (c.in_channels, c.sample_size, c.sample_size)  # (32, 32, 32) for 1024 px (DC-AE: x32)

    def to(self, device: torch.device | str) -> "SanaFamily":
        self.pipe.to(device)
        if self.velocity_module is not None:
            self.velocity_module.to(device)
        return self

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        return {"vae": self.pipe.vae, "text_encoder": self.pipe.text_encoder}

    # -- text ----------------------------------------------------------------------------------------------
    def _encode(self, prompts: list[str], guidance: float) -> tuple[SanaConditioning, SanaConditioning | None]:
        """(cond, uncond) by the pipeline's own ``encode_prompt``; uncond (the empty prompt) only under guidance."""
        cfg = uses_uncond(guidance)
        pe, pm, npe, npm = self.pipe.encode_prompt(prompts, cfg, negative_prompt="", device=self.device,
                                                   max_sequence_length=self.max_sequence_length,
                                                   complex_human_instruction=self.instruction)
        return SanaConditioning(pe, mask=pm), (SanaConditioning(npe, mask=npm) if cfg else None)

    def _dropped_cond(self, cond: SanaConditioning, captions: list[str]) -> SanaConditioning:
        """Rows of dropped ("") captions get the unconditional embedding (the empty prompt without the instruction)."""
        drop = [i for i, c in enumerate(captions) if c == ""]
        if not drop or not self.instruction:
            return cond
        empty, mask, _, _ = self.pipe.encode_prompt([""] * len(drop), False, device=self.device,
                                                    max_sequence_length=self.max_sequence_length,
                                                    complex_human_instruction=None)
        states, full = cond.states.clone(), cond.mask.clone()
        states[drop], full[drop] = empty.to(states.dtype), mask.to(full.dtype)
        return SanaConditioning(states, mask=full)

    # -- the ODE -------------------------------------------------------------------------------------------
    def _velocity(self) -> torch.nn.Module:
        return SanaVelocity(self.pipe.transformer)

    def time_grid(self, steps: int) -> torch.Tensor:
        """0 -> 1: uniform (dt = 1/N) for our rectified flows, else at the scheduler's own (shifted) sigmas
        (FlowMatchEuler, or the flow sigmas of the DPM-Solver the released SANA folders name)."""
        if self.uniform:
            return time_grid(steps)
        return flow_matching_time_grid(type(self.pipe.scheduler).from_config(self.scheduler_config), steps)

    # -- images --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1]: DC-AE after undoing its scaling (no shift)."""
        vae = self.pipe.vae
        with self._autocast():
            images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype), return_dict=False)[0]
        return ((images.float() + 1) / 2).clamp(0, 1)

    # -- writing -------------------------------------------------------------------------------------------
    def save(self, dirpath: str | Path, denoiser: torch.nn.Module | None = None) -> Path:
        """A SANA pipeline folder plain diffusers samples as we do: FlowMatchEuler with shift 1, so
        ``sigmas=[1 - i / N for i in range(N)]`` are our uniform Euler steps (still a flow-matching model)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        out = Path(dirpath)
        scheduler, own = self.pipe.scheduler, self.pipe.transformer
        try:
            self.pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
            if denoiser is not None:
                self.pipe.transformer = denoiser
            self.pipe.save_pretrained(out)
        finally:
            self.pipe.scheduler, self.pipe.transformer = scheduler, own
        size = self.latent_shape[1] * self.pipe.vae_scale_factor
        atomic_write_json(out / loading.COMPONENTS_FILE, {
            "kind": "flow_matching", "family": self.name, "sampling": "uniform", "resolution": size,
            "diffusers": f"SanaPipeline.from_pretrained(dir)(prompt, num_inference_steps=N, sigmas=[1 - i / N for i "
                         f"in range(N)], height={size}, width={size}, use_resolution_binning=False)"})
        return out

    def write_lora_weights(self, out: Path, adapter: torch.nn.Module, metadata: dict) -> None:
        """A transformer LoRA in the format ``SanaLoraLoaderMixin`` reads (peft state dict under ``transformer.``)."""
        from diffusers.loaders import SanaLoraLoaderMixin
        from peft.utils import get_peft_model_state_dict

        SanaLoraLoaderMixin.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(adapter),
                                              safe_serialization=True, transformer_lora_adapter_metadata=metadata)
