"""FLUX.1: a flow-matching teacher in our time with packed latents and, for guidance-distilled checkpoints
(dev), the guidance scale as an input (no unconditional pass).

Its ``encode_prompt`` (T5 states, CLIP pooled), Euler at its scheduler's sigmas (linspace(1, 1/N, N) shifted
by mu from the image's token count, as ``FluxPipeline``), latents unpacked (B, 16, h, w) between steps.
"""

from __future__ import annotations

from typing import Callable

import torch

from instaflow.flow.conditioning import Conditioning
from instaflow.flow.flow_matching import fm_timestep, fm_to_velocity
from instaflow.flow.solvers import time_grid
from instaflow.models.families.base import saved_components
from instaflow.models.families.pipeline import PipelineFamily
from instaflow.models.families.sd3 import check_flow_matching, flow_matching_student


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> Flux's 2x2 patches (B, h/2 * w/2, 4C), as ``FluxPipeline._pack_latents``."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Flux's patches (B, h/2 * w/2, 4C) -> (B, C, h, w), as ``FluxPipeline._unpack_latents``."""
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


class FluxVelocity(torch.nn.Module):
    """A Flux transformer as v(x_t, t, cond) on unpacked latents (B, C, h, w) in our time.

    Flux is a flow-matching model fed sigma itself (its pipeline passes timestep / 1000): packed x_t,
    timestep 1 - t, the guidance input of guidance-distilled checkpoints (``cond.guidance``), zero text
    ids and (row, column) image ids as the pipeline makes them; v = -unpack(output) (``flow_matching``).
    """

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        b, _, h, w = x_t.shape
        img_ids = torch.zeros(h // 2, w // 2, 3)
        img_ids[..., 1] += torch.arange(h // 2)[:, None]
        img_ids[..., 2] += torch.arange(w // 2)[None, :]
        txt_ids = torch.zeros(cond.states.shape[1], 3)
        out = self.transformer(hidden_states=pack_latents(x_t), timestep=fm_timestep(t, 1.0).to(x_t.dtype),
                               guidance=cond.guidance, pooled_projections=cond.pooled,
                               encoder_hidden_states=cond.states, txt_ids=txt_ids.to(x_t),
                               img_ids=img_ids.reshape(-1, 3).to(x_t), return_dict=False)[0]
        return fm_to_velocity(unpack_latents(out, h, w))


class FluxFamily(PipelineFamily):
    """A FLUX.1 pipeline; ``resolution``: the pixel size it samples; ``uniform``: Euler with dt = 1/N (our
    rectified flows); ``guidance_input``: a student's fixed guidance input (it was trained at that value)."""

    name = "flux"
    title = "Flux"
    pipeline_class = "FluxPipeline"
    conditioning = "T5 token states, CLIP pooled output, guidance as an input (no unconditional pass)"
    options = ("resolution",)
    ignores = ()
    kind = "flow_matching"

    def __init__(self, pipe, resolution: int = 1024, max_sequence_length: int = 512, uniform: bool = False,
                 guidance_input: float | None = None) -> None:
        self.pipe, self.resolution, self.max_sequence_length = pipe, resolution, max_sequence_length
        self.uniform, self.guidance_input = uniform, guidance_input

    @classmethod
    def from_pretrained(cls, pretrained: str, resolution: int | None = None, uniform: bool | None = None,
                        **kw) -> "FluxFamily":
        """Load a Flux folder or hub id; a folder this framework wrote also fixes resolution, uniform steps
        and the guidance input it was trained at."""
        pipe = cls.load_pipe(pretrained)
        saved = saved_components(pretrained)
        kw.setdefault("guidance_input", saved.get("guidance_input"))
        return cls(pipe, resolution=resolution or saved.get("resolution", 1024),
                   uniform=saved.get("sampling") == "uniform" if uniform is None else uniform, **kw)

    @classmethod
    def load(cls, pretrained: str, kind: str | None = None, resolution: int | None = None) -> "FluxFamily":
        check_flow_matching(cls.title, pretrained, kind)
        return cls.from_pretrained(pretrained, resolution=resolution)

    @classmethod
    def student_kind(cls, init: str, parameterization: str) -> str:
        return flow_matching_student(cls.name, init, parameterization)

    @classmethod
    def load_student(cls, init: str, kind: str, wrap: Callable | None = None, resolution: int | None = None,
                     guidance_input: float | None = None, **settings) -> "FluxFamily":
        return cls.from_pretrained(init, uniform=True, resolution=resolution, guidance_input=guidance_input)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        h = 2 * (self.resolution // (self.pipe.vae_scale_factor * 2))
        return (self.pipe.transformer.config.in_channels // 4, h, h)  # (16, 128, 128) at 1024 px

    def _encode(self, prompts: list[str], guidance: float) -> tuple[Conditioning, None]:
        """(cond, None): a guidance-distilled Flux takes w as an input; there is no unconditional pass."""
        pe, ppe, _ = self.pipe.encode_prompt(prompts, prompts, device=self.device,
                                             max_sequence_length=self.max_sequence_length)
        w = self.guidance_input if self.guidance_input is not None else guidance
        g = (torch.full((len(prompts),), float(w), device=self.device)
             if self.pipe.transformer.config.guidance_embeds else None)
        return Conditioning(pe, ppe, guidance=g), None

    def _velocity(self) -> torch.nn.Module:
        return FluxVelocity(self.pipe.transformer)

    def time_grid(self, steps: int) -> torch.Tensor:
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        if self.uniform:
            return time_grid(steps)
        c = self.scheduler_config
        _, h, w = self.latent_shape
        mu = calculate_shift((h // 2) * (w // 2), c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        sched = FlowMatchEulerDiscreteScheduler.from_config(c)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        return 1.0 - sched.sigmas.to(torch.float64)

    def write_lora_weights(self, out, adapter: torch.nn.Module, metadata: dict) -> None:
        """A transformer LoRA in the format diffusers' Flux LoRA training writes (``FluxLoraLoaderMixin``)."""
        from diffusers.loaders import FluxLoraLoaderMixin
        from peft.utils import get_peft_model_state_dict

        FluxLoraLoaderMixin.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(adapter),
                                              safe_serialization=True, transformer_lora_adapter_metadata=metadata)

    def saved_scheduler(self):
        """No dynamic shifting, shift 1: ``FluxPipeline``'s default sigmas (linspace(1, 1/N, N), then 0) are our
        uniform Euler steps; call it with ``guidance_scale`` = the guidance input the student was trained at."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config, use_dynamic_shifting=False,
                                                           shift=1.0)

    def components_record(self) -> dict:
        return {"kind": "flow_matching", "family": self.name, "sampling": "uniform", "resolution": self.resolution,
                "guidance_input": self.guidance_input,
                "diffusers": f"{self.pipeline_class}.from_pretrained(dir)(prompt, num_inference_steps=N, "
                             "guidance_scale=guidance_input, height=resolution, width=resolution)"}
