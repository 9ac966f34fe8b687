"""Sampling: seeded noise, the teacher's DPM-Solver++ through diffusers, and latent decoding."""

from __future__ import annotations

from typing import Iterable

import torch


def seeded_noise(seeds: Iterable[int], shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
    """x0 ~ N(0, I), one CPU generator per seed: any machine regenerates the same noise from the seed."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=dtype)
                        for s in seeds])  # (B, *shape)


def dpm_solver_scheduler(scheduler_config: dict, steps: int):
    """DPM-Solver++(2M) over the teacher's schedule, trailing spacing, final sigma 0 (see PITFALLS.md)."""
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler.from_config(
        scheduler_config, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing",
        final_sigmas_type="zero", lower_order_final=True,
    )
    sched.set_timesteps(steps)
    return sched


@torch.no_grad()
def sample_dpm_solver(unet, scheduler_config: dict, x0: torch.Tensor, cond: torch.Tensor,
                      uncond: torch.Tensor | None, guidance: float, steps: int,
                      path: list | None = None) -> torch.Tensor:
    """Solve a DDPM teacher's probability-flow ODE from x0 with DPM-Solver++ (Lu et al. 2022) and CFG.

    ``path`` (optional) receives ``(t, x_t)`` after every step, mapped into flow time and flow
    coordinates (t = 1 / (1 + sigma), x_t = x_s / (sqrt(ab) + sqrt(1 - ab))), for straightness.
    """
    from lightning_modules.flows import cfg_combine

    sched = dpm_solver_scheduler(scheduler_config, steps)
    x = x0 * sched.init_noise_sigma
    use_cfg = guidance > 1.0 and uncond is not None
    states = torch.cat([uncond, cond]) if use_cfg else cond
    for t in sched.timesteps:
        inp = torch.cat([x, x]) if use_cfg else x
        inp = sched.scale_model_input(inp, t)
        out = unet(inp, t, encoder_hidden_states=states.to(x.dtype)).sample
        if use_cfg:
            out = cfg_combine(*out.chunk(2), guidance)
        x = sched.step(out, t, x).prev_sample
        if path is not None:
            sigma = float(sched.sigmas[sched.step_index])  # noise level x is now at (VP: n / s)
            path.append((1.0 / (1.0 + sigma), x * ((1 + sigma**2) ** 0.5 / (1 + sigma))))
    return x


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1], (B, 3, H, W), undoing the VAE's scaling factor."""
    images = vae.decode(latents / vae.config.scaling_factor).sample
    return ((images.float() + 1) / 2).clamp(0, 1)
