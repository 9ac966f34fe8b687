"""SD3 / SD3.5: a flow-matching teacher in our time (no weights change: it is already a flow).

Its own ``encode_prompt`` makes the conditioning (CLIP-L + CLIP-G token states concatenated and padded to
T5's width, then T5's; pooled = both CLIP projections); Euler in our time along the scheduler's own
(shifted) sigmas (``instaflow.flow.flow_matching``) is, step for step, the pipeline's loop.
"""

from __future__ import annotations

from typing import Callable

import torch

from instaflow.flow.conditioning import Conditioning
from instaflow.flow.flow_matching import FlowMatchingVelocity, flow_matching_time_grid
from instaflow.flow.guidance import uses_uncond
from instaflow.flow.solvers import time_grid
from instaflow.models.families.base import saved_components
from instaflow.models.families.pipeline import PipelineFamily


def check_flow_matching(title: str, pretrained: str, kind: str | None) -> None:
    """A flow-matching family is read one way: kind null or flow_matching, else a ValueError naming the folder."""
    if kind not in (None, "flow_matching"):
        raise ValueError(f"'{pretrained}' is a {title} pipeline (a flow-matching model): kind must be null or "
                         f"flow_matching, got {kind!r}")


def flow_matching_student(name: str, init: str, parameterization: str) -> str:
    """The kind of a student of a flow-matching family: ``flow_matching``, trained as the flow it already is."""
    if parameterization != "flow":
        raise ValueError(f"'{init}' is a {name} pipeline, a flow-matching model already: use "
                         f"parameterization flow (got {parameterization!r})")
    return "flow_matching"


class SD3Family(PipelineFamily):
    """An SD3 / SD3.5 pipeline. ``uniform``: Euler with dt = 1/N (our rectified flows) instead of the scheduler's
    sigmas; a folder this framework wrote says which."""

    name = "sd3"
    title = "SD3"
    pipeline_class = "StableDiffusion3Pipeline"
    conditioning = "CLIP-L + CLIP-G + T5 token states, CLIP pooled projections (encode_prompt)"
    kind = "flow_matching"

    def __init__(self, pipe, max_sequence_length: int = 256, uniform: bool = False) -> None:
        self.pipe, self.max_sequence_length, self.uniform = pipe, max_sequence_length, uniform

    @classmethod
    def from_pretrained(cls, pretrained: str, uniform: bool | None = None, **kw) -> "SD3Family":
        """Load an SD3 folder or hub id; ``uniform`` defaults to what a folder this framework wrote says."""
        pipe = cls.load_pipe(pretrained)
        if uniform is None:
            uniform = saved_components(pretrained).get("sampling") == "uniform"
        return cls(pipe, uniform=uniform, **kw)

    @classmethod
    def load(cls, pretrained: str, kind: str | None = None) -> "SD3Family":
        check_flow_matching(cls.title, pretrained, kind)
        return cls.from_pretrained(pretrained)

    @classmethod
    def student_kind(cls, init: str, parameterization: str) -> str:
        return flow_matching_student(cls.name, init, parameterization)

    @classmethod
    def load_student(cls, init: str, kind: str, wrap: Callable | None = None, **settings) -> "SD3Family":
        return cls.from_pretrained(init, uniform=True)  # our flows: dt = 1/N

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.pipe.transformer.config
        return (c.in_channels, c.sample_size, c.sample_size)  # (16, 128, 128) for 1024 px

    def _encode(self, prompts: list[str], guidance: float) -> tuple[Conditioning, Conditioning | None]:
        """(cond, uncond) by the pipeline's own ``encode_prompt``; uncond (empty prompt) only under guidance (w != 1)."""
        cfg = uses_uncond(guidance)
        pe, npe, ppe, nppe = self.pipe.encode_prompt(prompts, prompts, prompts, device=self.device,
                                                     do_classifier_free_guidance=cfg,
                                                     max_sequence_length=self.max_sequence_length)
        return Conditioning(pe, ppe), (Conditioning(npe, nppe) if cfg else None)

    def _velocity(self) -> torch.nn.Module:
        return FlowMatchingVelocity(self.pipe.transformer)

    def time_grid(self, steps: int) -> torch.Tensor:
        """0 -> 1: uniform (dt = 1/N) for our rectified flows, else at the family scheduler's (shifted) sigmas."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if self.uniform:
            return time_grid(steps)
        return flow_matching_time_grid(FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config), steps)

    def write_lora_weights(self, out, adapter: torch.nn.Module, metadata: dict) -> None:
        """A transformer LoRA in the format diffusers' SD3 LoRA training writes (``SD3LoraLoaderMixin``)."""
        from diffusers.loaders import SD3LoraLoaderMixin
        from peft.utils import get_peft_model_state_dict

        SD3LoraLoaderMixin.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(adapter),
                                             safe_serialization=True, transformer_lora_adapter_metadata=metadata)

    def saved_scheduler(self):
        """Shift 1, so ``pipe(..., sigmas=[1 - i / N for i in range(N)])`` takes our uniform Euler steps (dt = 1/N):
        a trained SD3 rectified flow is still a flow-matching model that ``StableDiffusion3Pipeline`` samples."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config, shift=1.0)

    def components_record(self) -> dict:
        return {"kind": "flow_matching", "family": self.name, "sampling": "uniform",
                "diffusers": f"{self.pipeline_class}.from_pretrained(dir)(prompt, num_inference_steps=N, "
                             "sigmas=[1 - i / N for i in range(N)])"}
