"""SANA (Xie et al. 2024, "SANA: Efficient High-Resolution Image Synthesis with Linear Diffusion Transformers"):
a Gemma-2 text encoder, a linear-attention transformer and a 32x deep-compression autoencoder (DC-AE).

Why SANA and not PixArt-Sigma as the fifth family: SANA is trained by flow matching (the transformer
predicts noise - data at timestep sigma * 1000, as SD3's), so it reads as a velocity field in
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
from typing import Callable

import torch

from instaflow.flow.conditioning import Conditioning
from instaflow.flow.flow_matching import flow_matching_time_grid, fm_timestep, fm_to_velocity
from instaflow.flow.guidance import uses_uncond
from instaflow.flow.solvers import time_grid
from instaflow.models.families.base import saved_components
from instaflow.models.families.pipeline import PipelineFamily
from instaflow.models.families.sd3 import check_flow_matching, flow_matching_student

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
    """The ``complex_human_instruction`` that ``SanaPipeline.__call__`` prepends by default (the installed one's)."""
    from diffusers import SanaPipeline

    return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


class SanaFamily(PipelineFamily):
    """A SANA pipeline as a flow-matching teacher, or a rectified flow trained from one (module docstring).

    ``uniform``: Euler with dt = 1/N (our flows) instead of the scheduler's shifted sigmas; ``instruction``:
    the text prepended to each prompt before encoding (None: the pipeline's default; [] for none).
    """

    name = "sana"
    title = "SANA"
    pipeline_class = "SanaPipeline"
    conditioning = "Gemma-2 token states of the instruction-prefixed prompt, with their attention mask"
    kind = "flow_matching"

    def __init__(self, pipe, uniform: bool = False, max_sequence_length: int = 300,
                 instruction: list[str] | None = None) -> None:
        self.pipe, self.uniform, self.max_sequence_length = pipe, uniform, max_sequence_length
        self.instruction = pipeline_instruction() if instruction is None else instruction

    @classmethod
    def load(cls, pretrained: str, kind: str | None = None) -> "SanaFamily":
        """A SANA folder or hub id; a folder this framework wrote samples uniformly (its components file says)."""
        check_flow_matching(cls.title, pretrained, kind)
        return cls(cls.load_pipe(pretrained), uniform=saved_components(pretrained).get("sampling") == "uniform")

    @classmethod
    def student_kind(cls, init: str, parameterization: str) -> str:
        return flow_matching_student(cls.name, init, parameterization)

    @classmethod
    def load_student(cls, init: str, kind: str, wrap: Callable | None = None, **settings) -> "SanaFamily":
        return cls(cls.load_pipe(init), uniform=True)  # our flows: dt = 1/N

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.pipe.transformer.config
        return (c.in_channels, c.sample_size, c.sample_size)  # (32, 32, 32) for 1024 px (DC-AE: x32)

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

    def _velocity(self) -> torch.nn.Module:
        return SanaVelocity(self.pipe.transformer)

    def time_grid(self, steps: int) -> torch.Tensor:
        """0 -> 1: uniform (dt = 1/N) for our rectified flows, else at the scheduler's own (shifted) sigmas
        (FlowMatchEuler, or the flow sigmas of the DPM-Solver the released SANA folders name)."""
        if self.uniform:
            return time_grid(steps)
        return flow_matching_time_grid(type(self.pipe.scheduler).from_config(self.scheduler_config), steps)

    def write_lora_weights(self, out, adapter: torch.nn.Module, metadata: dict) -> None:
        """A transformer LoRA in the format ``SanaLoraLoaderMixin`` reads (peft state dict under ``transformer.``)."""
        from diffusers.loaders import SanaLoraLoaderMixin
        from peft.utils import get_peft_model_state_dict

        SanaLoraLoaderMixin.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(adapter),
                                              safe_serialization=True, transformer_lora_adapter_metadata=metadata)

    def saved_scheduler(self):
        """FlowMatchEuler with shift 1, so ``pipe(..., sigmas=[1 - i / N for i in range(N)])`` takes our uniform
        Euler steps: a trained SANA rectified flow is still a flow-matching model that ``SanaPipeline`` samples."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(shift=1.0)

    def components_record(self) -> dict:
        size = self.latent_shape[1] * self.pipe.vae_scale_factor
        return {"kind": "flow_matching", "family": self.name, "sampling": "uniform", "resolution": size,
                "diffusers": f"{self.pipeline_class}.from_pretrained(dir)(prompt, num_inference_steps=N, sigmas=[1 - i "
                             f"/ N for i in range(N)], height={size}, width={size}, use_resolution_binning=False)"}
