"""The reference the framework's DPM-Solver++ is tested against: diffusers' ``DPMSolverMultistepScheduler`` loop
over a DDPM UNet, with classifier-free guidance, exactly as the coupling stage ran it before issue 25 (the
solver now runs in flow time over the velocity conversion, ``instaflow.flow.solvers.sample_diffusion_teacher``).
"""

from __future__ import annotations

import torch

from instaflow.flow.conditioning import call_unet
from instaflow.flow.guidance import cfg_combine, uses_uncond
from instaflow.flow.solvers import check_steps, dpm_solver_scheduler

Tensor = torch.Tensor


@torch.no_grad()
def sample_dpm_solver(unet, scheduler_config: dict, x0: Tensor, cond, uncond, guidance: float, steps: int,
                      path: list | None = None) -> Tensor:
    """x1 of a DDPM teacher from x0 by diffusers' DPM-Solver++ loop, out_u + w (out_c - out_u) for every w != 1;
    ``path`` states in flow time and coordinates (t = 1 / (1 + sigma), x_t = x_s / (sqrt(ab) + sqrt(1 - ab)))."""
    sched = dpm_solver_scheduler(scheduler_config, check_steps(steps))
    if path is not None:
        path.append((0.0, x0))
    x = x0 * sched.init_noise_sigma
    use_cfg = uses_uncond(guidance) and uncond is not None
    if use_cfg:
        states = torch.cat([uncond, cond]) if isinstance(cond, Tensor) else type(cond).cat([uncond, cond])
    else:
        states = cond
    states = states.to(x.dtype)
    for t in sched.timesteps:
        inp = torch.cat([x, x]) if use_cfg else x
        inp = sched.scale_model_input(inp, t)
        out = call_unet(unet, inp, t, states)
        if use_cfg:
            out = cfg_combine(*out.chunk(2), guidance)
        x = sched.step(out, t, x).prev_sample
        if path is not None:
            sigma = float(sched.sigmas[sched.step_index])  # noise level x is now at (VP: n / s)
            path.append((1.0 / (1.0 + sigma), x * ((1 + sigma**2) ** 0.5 / (1 + sigma))))
    return x
