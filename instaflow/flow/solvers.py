"""ODE solvers in flow time, and the diffusion teacher's DPM-Solver++ through diffusers.

Every solver can record its *path*: ``path`` (a list) receives ``(t, x_t)`` for the start state
and after every step, in flow time and flow coordinates, for ``straightness``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from instaflow.flow.checks import is_whole
from instaflow.flow.conditioning import call_unet
from instaflow.flow.guidance import VelocityFn, cfg_combine, uses_uncond

Tensor = torch.Tensor


def check_steps(steps, key: str = "steps") -> int:
    """``steps`` as an int, or a ValueError naming ``key`` unless it is a whole number >= 1."""
    if not is_whole(steps, 1):
        raise ValueError(f"{key} must be a whole number of solver steps >= 1 (e.g. 1 or 25), got {steps!r}")
    return int(steps)


def time_grid(steps: int, t_start: float = 0.0, t_end: float = 1.0, device=None) -> Tensor:
    """Uniform grid t_start -> t_end with ``steps`` intervals (InstaFlow samples with dt = 1/N)."""
    steps = check_steps(steps)
    return torch.linspace(t_start, t_end, steps + 1, device=device, dtype=torch.float64)


@torch.no_grad()
def sample_euler(v_fn: VelocityFn, x: Tensor, ts: Sequence[float] | Tensor, path: list | None = None) -> Tensor:
    """Euler steps x <- x + (t_next - t) v(x, t) along ``ts`` (Liu et al. 2022, Algorithm 1)."""
    ts = torch.as_tensor(ts, dtype=torch.float64)
    if path is not None:
        path.append((float(ts[0]), x))
    for t, t_next in zip(ts[:-1], ts[1:]):
        dt = float(t_next - t)
        v = v_fn(x, torch.full((x.shape[0],), float(t), device=x.device))
        x = x + dt * v  # Euler step.
        if path is not None:
            path.append((float(t_next), x))
    return x


@torch.no_grad()
def sample_heun(v_fn: VelocityFn, x: Tensor, ts: Sequence[float] | Tensor, path: list | None = None) -> Tensor:
    """Heun's 2nd-order steps (Karras et al. 2022, EDM, Algorithm 1, in flow time)."""
    ts = torch.as_tensor(ts, dtype=torch.float64)
    if path is not None:
        path.append((float(ts[0]), x))
    for t, t_next in zip(ts[:-1], ts[1:]):
        dt = float(t_next - t)
        tb = torch.full((x.shape[0],), float(t), device=x.device)
        v = v_fn(x, tb)
        x_euler = x + dt * v  # Euler step.
        v_next = v_fn(x_euler, torch.full_like(tb, float(t_next)))
        v_avg = 0.5 * (v + v_next)  # Apply 2nd order correction.
        x = x + dt * v_avg
        if path is not None:
            path.append((float(t_next), x))
    return x


def dpm_solver_scheduler(scheduler_config: dict, steps: int):
    """DPM-Solver++(2M) over the teacher's schedule, trailing spacing, final sigma 0 (docs/pitfalls.md)."""
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler.from_config(
        scheduler_config, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing",
        final_sigmas_type="zero", lower_order_final=True,
    )
    sched.set_timesteps(steps)
    return sched


@torch.no_grad()
def sample_dpm_solver(unet, scheduler_config: dict, x0: Tensor, cond: Tensor, uncond: Tensor | None,
                      guidance: float, steps: int, path: list | None = None) -> Tensor:
    """Solve a DDPM teacher's probability-flow ODE from x0 with DPM-Solver++ (Lu et al. 2022) and CFG
    (out_u + w (out_c - out_u) for every guidance w != 1 when ``uncond`` is given; ``guidance.guided``'s rule).

    ``path`` states are mapped into flow time and coordinates (t = 1 / (1 + sigma),
    x_t = x_s / (sqrt(ab) + sqrt(1 - ab))).
    """
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
