"""ODE solvers in flow time over a velocity field, every one ``sampler(v_fn, x, ts, path=None)``
(k-diffusion's ``sampling.py``, in flow time): Euler, Heun, DPM-Solver++(2M); and the diffusion
teacher's DPM-Solver++ grid, so that a DDPM teacher is solved through its velocity conversion.

Every solver can record its *path*: ``path`` (a list) receives ``(t, x_t)`` for the start state
and after every step, in flow time and flow coordinates, for ``straightness``.
"""

from __future__ import annotations

from typing import Sequence

import math

import torch

from instaflow.flow import diffusion
from instaflow.flow.checks import is_whole
from instaflow.flow.guidance import VelocityFn

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


def _lam(t: float) -> float:
    """Half log-SNR in flow time, lambda = log(t / (1 - t)) (alpha_t = t, sigma_t = 1 - t)."""
    return math.log(t) - math.log1p(-t)


@torch.no_grad()
def sample_dpmpp_2m(v_fn: VelocityFn, x: Tensor, ts: Sequence[float] | Tensor, path: list | None = None) -> Tensor:
    """DPM-Solver++(2M) in flow time (Lu et al. 2022, DPM-Solver++, Algorithm 2; diffusers' "midpoint" form).

    The data prediction is x1_hat = x_t + (1 - t) v(x_t, t) on the path alpha_t = t, sigma_t = 1 - t,
    lambda = log(t / (1 - t)); the solver is exact under rescaling x, so on SD's VP path it takes the
    same steps. The first step (no history) and the last one are first order (diffusers'
    ``lower_order_final``; a last step to t = 1 returns x1_hat): a first-order step is Euler's step.
    ``ts`` increase in [0, 1]; arithmetic is float32 or wider (as diffusers upcasts), the state keeps x's dtype.
    """
    ts = torch.as_tensor(ts, dtype=torch.float64)
    if path is not None:
        path.append((float(ts[0]), x))
    n, prev = len(ts) - 1, None  # prev: (lambda, x1_hat) of the step before, for the 2nd-order term
    for i, (t, t_next) in enumerate(zip(ts[:-1].tolist(), ts[1:].tolist())):
        v = v_fn(x, torch.full((x.shape[0],), t, device=x.device))
        wide = torch.promote_types(x.dtype, torch.float32)
        d = x.to(wide) + (1.0 - t) * v.to(wide)  # x1_hat, (B, ...)
        a, b = (1.0 - t_next) / (1.0 - t), t_next - t * (1.0 - t_next) / (1.0 - t)  # sigma ratio, alpha (1 - e^-h)
        if prev is not None and i < n - 1:  # 2nd order: D0 + (D0 - D_prev) / (2 r0), r0 = h_prev / h
            lam, lam_prev, lam_next = _lam(t), prev[0], _lam(t_next)
            r0 = (lam - lam_prev) / (lam_next - lam)
            step_d = d + (0.5 / r0) * (d - prev[1])
        else:
            step_d = d
        prev = (_lam(t), d) if 0.0 < t < 1.0 else None
        x = (a * x.to(wide) + b * step_d).to(x.dtype)
        if path is not None:
            path.append((t_next, x))
    return x


def teacher_time_grid(scheduler_config: dict, steps: int) -> Tensor:
    """Flow times t = 1 / (1 + sigma) of the teacher's DPM-Solver++ grid (``dpm_solver_scheduler``), 1.0 last.

    (steps + 1,), float64: the discrete timesteps' noise levels, computed as ``velocity`` computes its
    t_min, so the first time is the schedule's noisiest level and the conversion feeds the UNet
    timesteps 999, ... (up to float rounding).
    """
    sched = dpm_solver_scheduler(scheduler_config, check_steps(steps))
    ab = sched.alphas_cumprod.to(torch.float64)[sched.timesteps.long()]  # (steps,)
    return torch.cat([diffusion.alpha_bar_to_t(ab), torch.ones(1, dtype=torch.float64)])


def sample_diffusion_teacher(v_fn: VelocityFn, x0: Tensor, scheduler_config: dict, steps: int,
                             path: list | None = None) -> Tensor:
    """Solve a DDPM teacher's probability-flow ODE from unit noise x0 as diffusers' DPM-Solver++(2M) does.

    ``v_fn``: the teacher as a velocity field, e.g. ``guided(velocity_field(unet, "ddpm", cfg), cond,
    uncond, w)``. Like diffusers, x0 is taken as the diffusion state at the first grid time t0 (flow
    state x0 sqrt(t0^2 + (1 - t0)^2)); ``path`` starts with (0.0, x0), as every solver's path starts
    with the noise itself, then (t, x_t) after every step (Lu et al. 2022, DPM-Solver++).
    """
    ts = teacher_time_grid(scheduler_config, steps)
    steps_path = [] if path is not None else None
    x = sample_dpmpp_2m(v_fn, diffusion.diffusion_to_flow_state(x0, float(ts[0])), ts, steps_path)
    if path is not None:
        path.append((0.0, x0))
        path.extend(steps_path[1:])
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
