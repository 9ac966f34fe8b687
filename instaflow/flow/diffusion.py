"""Diffusion (DDPM) noise levels and model outputs converted into this project's flow time."""

from __future__ import annotations

import torch

from instaflow.flow.paths import bcast

Tensor = torch.Tensor

# Stable Diffusion 1.x/2.x's training schedule (the embedded teacher is trained on it too).
SD_SCHEDULE = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
}


def alphas_cumprod(scheduler_config: dict) -> Tensor:
    """The DDPM schedule's cumulative alphas, (num_train_timesteps,), as diffusers computes them."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler_config).alphas_cumprod.clone()


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


def diffusion_to_flow_state(x_s: Tensor, t: float) -> Tensor:
    """x_t = x_s / c(t) = x_s sqrt(t^2 + (1 - t)^2): a diffusion state (unit noise) in flow coordinates, same SNR."""
    return x_s * (t * t + (1 - t) ** 2) ** 0.5


def diffusion_to_x1_eps(output: Tensor, x_s: Tensor, alpha_bar: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    """(x1_hat, eps_hat) from a DDPM model output (Ho et al. 2020 eps; Salimans & Ho 2022 v, eq. 13)."""
    s, n = bcast(alpha_bar.sqrt(), x_s), bcast((1 - alpha_bar).sqrt(), x_s)
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
