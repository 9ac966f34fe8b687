"""Flow-matching teachers (SD3 / SD3.5, Flux) in this project's flow time.

Their convention (Esser et al. 2024, SD3, sec. 2; diffusers' ``FlowMatchEulerDiscreteScheduler``):
x_sigma = (1 - sigma) x_data + sigma noise, sigma from 1 (noise) to 0 (data), the network fed the
timestep ``sigma * 1000`` (SD3; Flux is fed sigma itself and scales inside) and predicting
``noise - x_data`` = d x_sigma / d sigma. Ours: t = 0 noise, t = 1 data, x_t = t x1 + (1 - t) x0.

So t = 1 - sigma gives the same points (x_t = x_sigma with x1 = x_data, x0 = noise), and our
velocity v = dx_t/dt = x1 - x0 = -(d x_sigma / d sigma): v(x_t, t) = -net(x_t, timestep (1 - t) * scale).
The scheduler's ``shift`` (sigma -> shift sigma / (1 + (shift - 1) sigma)) only chooses where the
steps fall; ``flow_matching_time_grid`` reads those points off the family's own scheduler, so Euler
in our time along them is, step for step, the pipeline's ``scheduler.step``:
x + (t_next - t) v = x + (sigma_next - sigma) net.
"""

from __future__ import annotations

import torch

from instaflow.flow.conditioning import Conditioning

Tensor = torch.Tensor


def fm_timestep(t: Tensor, scale: float = 1000.0) -> Tensor:
    """The flow-matching network's timestep input at our time t: sigma * scale with sigma = 1 - t (SD3, sec. 2)."""
    return (1.0 - t) * scale


def fm_to_velocity(output: Tensor) -> Tensor:
    """Our velocity dx_t/dt from a flow-matching prediction of noise - x_data (= dx/dsigma): its negative."""
    return -output


def flow_matching_time_grid(scheduler, steps: int, **set_timesteps_kwargs) -> Tensor:
    """Our time grid 0 -> 1 (float64) at the family scheduler's sigmas for ``steps`` steps (shift included)."""
    scheduler.set_timesteps(steps, **set_timesteps_kwargs)
    return 1.0 - scheduler.sigmas.to(torch.float64)


class FlowMatchingVelocity(torch.nn.Module):
    """An SD3-style transformer as a velocity field v(x_t, t, cond) in our time (module docstring's derivation)."""

    def __init__(self, transformer: torch.nn.Module, timestep_scale: float = 1000.0) -> None:
        super().__init__()
        self.transformer, self.timestep_scale = transformer, timestep_scale

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        out = self.transformer(hidden_states=x_t, timestep=fm_timestep(t, self.timestep_scale).to(x_t.dtype),
                               encoder_hidden_states=cond.states, pooled_projections=cond.pooled,
                               return_dict=False)[0]
        return fm_to_velocity(out)
