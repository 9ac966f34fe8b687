"""UNets seen as velocity fields v(x_t, t | text) in flow time (k-diffusion's external.py, in flow time)."""

from __future__ import annotations

import torch
from torch import nn

from instaflow.flow import diffusion
from instaflow.flow.conditioning import call_unet
from instaflow.flow.paths import bcast, rf_unet_timestep


# What the conversion does below the schedule's noisiest level t_min (about 0.064 for SD's schedule),
# where the UNet was never trained; every choice feeds it its noisiest timestep. Measured on val
# (docs/velocity_boundary.md, ``python -m instaflow.tools.boundary``); BOUNDARY is the one kept.
BOUNDARIES = (
    "scale_t_min",    # x_s = c(t_min) x_t and the conversion at t_min (the first version: at t = 0 the
                      # UNet sees 1.066 x0 where DPM-Solver feeds it x0)
    "scale_t",        # x_s = c(t) x_t (c(0) = 1: the UNet sees x0 itself), the conversion at t_min
    "x1_consistent",  # input as "scale_t"; below t_min v = (x1_hat - x_t) / (1 - t), the velocity that
                      # points from the actual x_t to the UNet's x1 estimate (above t_min: the conversion)
)
BOUNDARY = "x1_consistent"  # lowest val FID of the step-0 model at 1 and 2 Euler steps; equal at 8


class DiffusionVelocity(nn.Module):
    """A DDPM UNet (epsilon or v prediction) seen as a velocity field v(x_t, t | text) in flow time."""

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 boundary: str = BOUNDARY):
        super().__init__()
        if boundary not in BOUNDARIES:
            raise ValueError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
        self.unet = unet
        self.prediction_type = prediction_type
        self.boundary = boundary
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64), persistent=False)
        # below the schedule's noisiest level the teacher knows nothing more: hold its boundary
        self.t_min = float(diffusion.alpha_bar_to_t(self.alphas_cumprod[-1]))  # once, not per UNet call

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        t_true = t.to(torch.float64).clamp(0.0, 1 - 1e-6)
        t64 = t_true.clamp(min=self.t_min)
        ab = diffusion.t_to_alpha_bar(t64)
        timestep = diffusion.ddpm_timestep(ab, self.alphas_cumprod)  # (B,)
        scale_t = t64 if self.boundary == "scale_t_min" else t_true
        x_s = x_t * bcast(diffusion.flow_to_diffusion_scale(scale_t), x_t)  # same SNR, unit noise
        out = call_unet(self.unet, x_s, timestep.to(x_t.dtype), states)
        x1_hat, eps_hat = diffusion.diffusion_to_x1_eps(out, x_s, ab.to(x_t.dtype), self.prediction_type)
        v = x1_hat - eps_hat  # (B, C, h, w)
        if self.boundary != "x1_consistent":
            return v
        below = (t_true < self.t_min).reshape(-1, *([1] * (x_t.ndim - 1)))  # (B, 1, 1, 1)
        return torch.where(below, (x1_hat - x_t) / bcast((1 - t_true).to(x_t.dtype), x_t), v)


class RectifiedFlowVelocity(nn.Module):
    """A UNet trained on our interpolation, fed the released models' timestep 1000 (1 - t)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return call_unet(self.unet, x_t, rf_unet_timestep(t).to(x_t.dtype), states)


KINDS = ("ddpm", "flow", "ddpm_velocity")


def velocity_field(unet: nn.Module, kind: str, scheduler_config: dict, boundary: str = BOUNDARY) -> nn.Module:
    """The UNet of a model of ``kind`` as v(x_t, t, states) in flow time.

    "flow": a rectified-flow UNet fed 1000 (1 - t); "ddpm" and "ddpm_velocity": a diffusion UNet
    through the analytic conversion (a "ddpm" teacher is also solvable with DPM-Solver++).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "flow":
        return RectifiedFlowVelocity(unet)
    return DiffusionVelocity(unet, diffusion.alphas_cumprod(scheduler_config),
                             scheduler_config.get("prediction_type", "epsilon"), boundary)
