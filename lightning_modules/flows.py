"""Flow math as small pure functions.

The one time convention of this project, used everywhere:

    t = 0 is noise x0 ~ N(0, I), t = 1 is data x1,   x_t = t * x1 + (1 - t) * x0,
    velocity v = dx_t/dt, whose rectified-flow target is x1 - x0.

Rectified-flow UNets (ours and the released InstaFlow / 2-RF weights) are fed the timestep
``1000 * (1 - t)``, so the one-step model is called once at timestep 1000.

Diffusion teachers (DDPM, epsilon- or v-prediction) live on ``x_s = sqrt(ab) x1 + sqrt(1-ab) eps``.
Dividing by ``sqrt(ab) + sqrt(1-ab)`` maps that exactly onto our interpolation with ``x0 = eps``
and ``t = sqrt(ab) / (sqrt(ab) + sqrt(1-ab))``, which is how a teacher becomes a velocity field.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

Tensor = torch.Tensor
VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x_t (B, ...), t (B,)) -> v (B, ...)


def _bcast(t: Tensor, x: Tensor) -> Tensor:
    """Shape (B,) -> (B, 1, 1, ...) to broadcast against x."""
    return t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


# --- interpolation and targets ------------------------------------------------------------

def interpolate(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """x_t = t x1 + (1 - t) x0 (Liu et al. 2022, Rectified Flow, eq. 1)."""
    t = _bcast(t, x0)
    return t * x1 + (1 - t) * x0


def velocity_target(x0: Tensor, x1: Tensor) -> Tensor:
    """The straight-line velocity x1 - x0 that reflow regresses on (Liu et al. 2022, eq. 1)."""
    return x1 - x0


def rf_unet_timestep(t: Tensor) -> Tensor:
    """UNet timestep of the released InstaFlow / 2-RF models: 1000 (1 - t) (InstaFlow code, pipeline_rf.py)."""
    return 1000.0 * (1.0 - t)


# --- time samplers ------------------------------------------------------------------------

def sample_t_uniform(n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
    """t ~ U(0, 1) (Liu et al. 2022, Rectified Flow)."""
    return torch.rand(n, generator=generator, device=device)


def sample_t_logit_normal(n: int, mean: float = 0.0, std: float = 1.0,
                          generator: torch.Generator | None = None, device=None) -> Tensor:
    """t = sigmoid(N(mean, std^2)) (Esser et al. 2024, SD3, sec. 3.1)."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))


def sample_t_u_shaped(n: int, a: float = 4.0, generator: torch.Generator | None = None, device=None) -> Tensor:
    """p(t) proportional to cosh(a (t - 1/2)): mass at both ends (Lee et al. 2024, 2-Rectified-Flow++, eq. 9)."""
    u = torch.rand(n, generator=generator, device=device)
    t = torch.log1p(u * math.expm1(a)) / a  # inverse CDF of p(t) ~ exp(a t) on [0, 1]
    flip = torch.rand(n, generator=generator, device=device) < 0.5
    return torch.where(flip, 1.0 - t, t)


TIME_SAMPLERS = {"uniform": sample_t_uniform, "logit_normal": sample_t_logit_normal, "u_shaped": sample_t_u_shaped}


def sample_t(name: str, n: int, generator: torch.Generator | None = None, device=None, **kw) -> Tensor:
    """Dispatch to a named time sampler."""
    if name not in TIME_SAMPLERS:
        raise ValueError(f"unknown time distribution {name!r}; choose one of {sorted(TIME_SAMPLERS)}")
    return TIME_SAMPLERS[name](n, generator=generator, device=device, **kw)


# --- guidance -----------------------------------------------------------------------------

def cfg_combine(out_uncond: Tensor, out_cond: Tensor, w: float) -> Tensor:
    """out_u + w (out_c - out_u) (Ho & Salimans 2022, classifier-free guidance, eq. 6)."""
    return out_uncond + w * (out_cond - out_uncond)


def guided(model: Callable[[Tensor, Tensor, Tensor], Tensor], cond: Tensor, uncond: Tensor | None,
           w: float) -> VelocityFn:
    """Close a conditional model over its text states, with guidance when w > 1 (diffusers' rule).

    ``model(x, t, states)``; with w <= 1 only the conditional pass runs (InstaFlow samples its
    one-step model this way), otherwise the batch is doubled and combined with ``cfg_combine``.
    """
    if w <= 1.0 or uncond is None:
        return lambda x, t: model(x, t, cond)

    def fn(x: Tensor, t: Tensor) -> Tensor:
        out_u, out_c = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond])).chunk(2)
        return cfg_combine(out_u, out_c, w)

    return fn


# --- ODE solvers --------------------------------------------------------------------------

def time_grid(steps: int, t_start: float = 0.0, t_end: float = 1.0, device=None) -> Tensor:
    """Uniform grid t_start -> t_end with ``steps`` intervals (InstaFlow samples with dt = 1/N)."""
    return torch.linspace(t_start, t_end, steps + 1, device=device, dtype=torch.float64)


@torch.no_grad()
def sample_euler(v_fn: VelocityFn, x: Tensor, ts: Sequence[float] | Tensor,
                 trajectory: list | None = None) -> Tensor:
    """Euler steps x <- x + (t_next - t) v(x, t) along ``ts`` (Liu et al. 2022, Algorithm 1)."""
    ts = torch.as_tensor(ts, dtype=torch.float64)
    for t, t_next in zip(ts[:-1], ts[1:]):
        dt = float(t_next - t)
        v = v_fn(x, torch.full((x.shape[0],), float(t), device=x.device))
        if trajectory is not None:
            trajectory.append((float(t), dt, v))
        x = x + dt * v  # Euler step.
    return x


@torch.no_grad()
def sample_heun(v_fn: VelocityFn, x: Tensor, ts: Sequence[float] | Tensor,
                trajectory: list | None = None) -> Tensor:
    """Heun's 2nd-order steps (Karras et al. 2022, EDM, Algorithm 1, in flow time)."""
    ts = torch.as_tensor(ts, dtype=torch.float64)
    for t, t_next in zip(ts[:-1], ts[1:]):
        dt = float(t_next - t)
        tb = torch.full((x.shape[0],), float(t), device=x.device)
        v = v_fn(x, tb)
        x_euler = x + dt * v  # Euler step.
        v_next = v_fn(x_euler, torch.full_like(tb, float(t_next)))
        v_avg = 0.5 * (v + v_next)  # Apply 2nd order correction.
        if trajectory is not None:
            trajectory.append((float(t), dt, v_avg))
        x = x + dt * v_avg
    return x


# --- diffusion teachers as velocity fields ------------------------------------------------

def alpha_bar_to_t(alpha_bar: Tensor) -> Tensor:
    """Flow time of a DDPM noise level: t = sqrt(ab) / (sqrt(ab) + sqrt(1 - ab)) (Liu et al. 2022, sec. 3.4)."""
    s, n = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    return s / (s + n)


def t_to_alpha_bar(t: Tensor) -> Tensor:
    """Inverse of ``alpha_bar_to_t``: ab = t^2 / (t^2 + (1 - t)^2) (same signal-to-noise ratio)."""
    return t**2 / (t**2 + (1 - t) ** 2)


def flow_to_diffusion_scale(t: Tensor) -> Tensor:
    """x_s = c x_t with c = sqrt(ab) + sqrt(1 - ab) = 1 / sqrt(t^2 + (1 - t)^2) (same SNR, unit-variance noise)."""
    return 1.0 / (t**2 + (1 - t) ** 2).sqrt()


def diffusion_to_x1_eps(output: Tensor, x_s: Tensor, alpha_bar: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    """(x1_hat, eps_hat) from a DDPM model output (Ho et al. 2020 eps; Salimans & Ho 2022 v, eq. 13)."""
    s, n = _bcast(alpha_bar.sqrt(), x_s), _bcast((1 - alpha_bar).sqrt(), x_s)
    if prediction_type == "epsilon":
        eps = output
        x1 = (x_s - n * eps) / s
    elif prediction_type == "v_prediction":
        x1 = s * x_s - n * output
        eps = n * x_s + s * output
    elif prediction_type == "sample":
        x1 = output
        eps = (x_s - s * x1) / n
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    return x1, eps


def diffusion_to_velocity(output: Tensor, x_s: Tensor, alpha_bar: Tensor, prediction_type: str) -> Tensor:
    """v = x1_hat - eps_hat: the probability-flow velocity in flow time (Liu et al. 2022, sec. 3.4)."""
    x1, eps = diffusion_to_x1_eps(output, x_s, alpha_bar, prediction_type)
    return x1 - eps


def ddpm_timestep(alpha_bar: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Continuous DDPM timestep of a noise level, interpolated in log-SNR over the training schedule."""
    log_snr = (alphas_cumprod / (1 - alphas_cumprod)).log().to(torch.float64)  # decreasing in the timestep
    q = (alpha_bar / (1 - alpha_bar)).log().to(torch.float64).clamp(log_snr[-1], log_snr[0])
    idx = torch.searchsorted(-log_snr, -q).clamp(1, len(log_snr) - 1)
    lo, hi = log_snr[idx - 1], log_snr[idx]
    frac = (lo - q) / (lo - hi)
    return (idx - 1).to(torch.float64) + frac


# --- straightness -------------------------------------------------------------------------

def straightness(x0: Tensor, x1: Tensor, trajectory: list) -> Tensor:
    """S = sum_i dt_i E||(x1 - x0) - v_i||^2, the integral of Liu et al. 2022 (eq. 6), per sample.

    ``trajectory`` holds the (t, dt, v) of each solver step; the squared norm is averaged over
    elements, so S does not grow with resolution. 0 for straight paths.
    """
    direction = (x1 - x0).flatten(1)
    total = sum(dt * (direction - v.flatten(1)).pow(2).mean(1) for _, dt, v in trajectory)
    return total / sum(dt for _, dt, _ in trajectory)


def path_length_ratio(x0: Tensor, x1: Tensor, trajectory: list) -> Tensor:
    """Length of the solver's path over the chord ||x1 - x0||; 1.0 for a straight path, per sample."""
    length = sum(abs(dt) * v.flatten(1).norm(dim=1) for _, dt, v in trajectory)
    return length / (x1 - x0).flatten(1).norm(dim=1).clamp_min(1e-12)
