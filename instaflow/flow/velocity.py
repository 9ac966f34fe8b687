"""UNets seen as velocity fields v(x_t, t | text) in flow time (k-diffusion's external.py, in flow time)."""

from __future__ import annotations

import torch
from torch import nn

from instaflow.flow import diffusion
from instaflow.flow.paths import bcast, rf_unet_timestep


class DiffusionVelocity(nn.Module):
    """A DDPM UNet (epsilon or v prediction) seen as a velocity field v(x_t, t | text) in flow time."""

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        super().__init__()
        self.unet = unet
        self.prediction_type = prediction_type
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64), persistent=False)
        # below the schedule's noisiest level the teacher knows nothing more: hold its boundary
        self.t_min = float(diffusion.alpha_bar_to_t(self.alphas_cumprod[-1]))  # once, not per UNet call

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        t64 = t.to(torch.float64).clamp(self.t_min, 1 - 1e-6)
        ab = diffusion.t_to_alpha_bar(t64)
        timestep = diffusion.ddpm_timestep(ab, self.alphas_cumprod)  # (B,)
        x_s = x_t * bcast(diffusion.flow_to_diffusion_scale(t64), x_t)  # same SNR, unit noise
        out = self.unet(x_s, timestep.to(x_t.dtype), encoder_hidden_states=states).sample
        return diffusion.diffusion_to_velocity(out, x_s, ab.to(x_t.dtype), self.prediction_type)


class RectifiedFlowVelocity(nn.Module):
    """A UNet trained on our interpolation, fed the released models' timestep 1000 (1 - t)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, rf_unet_timestep(t).to(x_t.dtype), encoder_hidden_states=states).sample


KINDS = ("ddpm", "flow", "ddpm_velocity")


def velocity_field(unet: nn.Module, kind: str, scheduler_config: dict) -> nn.Module:
    """The UNet of a model of ``kind`` as v(x_t, t, states) in flow time.

    "flow": a rectified-flow UNet fed 1000 (1 - t); "ddpm" and "ddpm_velocity": a diffusion UNet
    through the analytic conversion (a "ddpm" teacher is also solvable with DPM-Solver++).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "flow":
        return RectifiedFlowVelocity(unet)
    return DiffusionVelocity(unet, diffusion.alphas_cumprod(scheduler_config),
                             scheduler_config.get("prediction_type", "epsilon"))
