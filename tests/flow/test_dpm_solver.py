"""DPM-Solver++(2M) over a velocity field in flow time: its order on an exact problem, and the DDPM
teacher's solve through the velocity conversion against the diffusers-driven solve it replaces."""

from __future__ import annotations

import json
import math

import pytest
import torch

from instaflow.flow import noise, solvers
from instaflow.flow.guidance import guided
from instaflow.flow.velocity import DiffusionVelocity, velocity_field
from tests.flow.dpm_reference import sample_dpm_solver

# Gaussian data x1 ~ N(mu, s^2) per element, x0 ~ N(0, 1): x_t ~ N(t mu, var_t), var_t = t^2 s^2 + (1 - t)^2,
# and the probability-flow ODE keeps z = (x_t - t mu) / sqrt(var_t) fixed: x1 = mu + s z exactly.
MU = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64).view(1, 3)
S = torch.tensor([0.2, 1.5, 0.05], dtype=torch.float64).view(1, 3)


def _var(t):
    return t**2 * S**2 + (1 - t) ** 2


def _gaussian_v(x, t):
    """E[x1 - x0 | x_t] for Gaussian data (closed form)."""
    t = t.to(torch.float64).view(-1, 1)
    return MU + (t * S**2 - (1 - t)) / _var(t) * (x - t * MU)


def _solve(sampler, steps, t_start=0.1, t_end=1.0, grid="t"):
    """(max |error| at t_end, path, start state) of a solve from the exact state at t_start."""
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = t_start * MU + _var(torch.tensor(t_start, dtype=torch.float64)).sqrt() * z  # exact state at t_start
    if grid == "t":
        ts = solvers.time_grid(steps, t_start, t_end)
    else:  # uniform in lambda = log(t / (1 - t)), DPM-Solver's own grid
        ts = torch.linspace(math.log(t_start / (1 - t_start)), math.log(t_end / (1 - t_end)), steps + 1,
                            dtype=torch.float64).sigmoid()
    path = []
    out = sampler(_gaussian_v, x, ts, path=path)
    exact = t_end * MU + _var(torch.tensor(t_end, dtype=torch.float64)).sqrt() * z
    return (out - exact).abs().max().item(), path, x


def test_dpmpp_2m_converges_at_second_order_on_gaussian_data():
    """Measured (max abs error, N = 16..128): 2.2e-2, 6.0e-3, 1.5e-3, 3.8e-4, orders 1.91, 1.98, 1.99."""
    errors = [_solve(solvers.sample_dpmpp_2m, n, t_end=0.95, grid="lambda")[0] for n in (16, 32, 64, 128)]
    orders = [math.log2(a / b) for a, b in zip(errors[:-1], errors[1:])]
    assert all(o > 1.85 for o in orders), (errors, orders)
    euler = [_solve(solvers.sample_euler, n, t_end=0.95, grid="lambda")[0] for n in (64, 128)]
    assert math.log2(euler[0] / euler[1]) < 1.2  # Euler is first order: the 2nd-order term does the work
    assert errors[-1] < euler[-1] / 10


def test_dpmpp_2m_solves_to_t1_where_its_last_step_returns_x1_hat():
    """Ending at t = 1 (lambda infinite) as the teacher's grid does; few steps there are pre-asymptotic."""
    errors = [_solve(solvers.sample_dpmpp_2m, n)[0] for n in (8, 32, 128)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 2e-3, errors  # measured 0.11, 0.020, 0.0015


def test_dpmpp_2m_path_has_the_solvers_format():
    err, path, x = _solve(solvers.sample_dpmpp_2m, 5)
    assert len(path) == 6 and all(isinstance(t, float) for t, _ in path)
    assert [round(t, 6) for t, _ in path] == [0.1, 0.28, 0.46, 0.64, 0.82, 1.0]
    assert path[0][1] is x and all(s.shape == x.shape and s.dtype == x.dtype for _, s in path)


def test_a_first_order_step_is_eulers_step_and_one_step_to_t1_returns_x1_hat():
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for ts in ([0.0, 0.3], [0.2, 0.7], [0.0, 1.0]):  # one step: first order
        want = solvers.sample_euler(_gaussian_v, x, ts)
        torch.testing.assert_close(solvers.sample_dpmpp_2m(_gaussian_v, x, ts), want)
    t = torch.full((4,), 0.4, dtype=torch.float64)
    torch.testing.assert_close(solvers.sample_dpmpp_2m(_gaussian_v, x, [0.4, 1.0]), x + 0.6 * _gaussian_v(x, t))


def test_dpmpp_2m_keeps_the_state_dtype():
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    out = solvers.sample_dpmpp_2m(lambda x, t: -x, x, [0.2, 0.5, 0.8, 1.0])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# -- the DDPM teacher through the conversion == diffusers' DPM-Solver++ driving the UNet ---------------------
@pytest.fixture(scope="module")
def tiny_teacher(tiny_sd_folder):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_sd_folder / "unet")).eval()
    cfg = json.loads((tiny_sd_folder / "scheduler" / "scheduler_config.json").read_text())
    return unet, {k: v for k, v in cfg.items() if not k.startswith("_")}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 2, 4, 25])
def test_teacher_solve_through_the_conversion_equals_diffusers_dpm_solver(tiny_teacher, steps, prediction_type):
    """Measured fp32 (tiny SD, |x1| ~ 50): max abs diff <= 4.2e-5, relative to max |x1| <= 8.4e-7, path alike."""
    unet, cfg = tiny_teacher
    cfg = {**cfg, "prediction_type": prediction_type}
    g = torch.Generator().manual_seed(0)
    x0 = noise.seeded_noise([0, 1, 2], (4, 8, 8))
    cond, uncond = torch.randn(3, 3, 8, generator=g), torch.randn(3, 3, 8, generator=g)
    for w, un in ((1.0, None), (1.0, uncond), (4.0, uncond), (0.5, uncond)):
        old_path, new_path = [], []
        old = sample_dpm_solver(unet, cfg, x0, cond, un, w, steps, path=old_path)  # diffusers' loop
        v_fn = guided(velocity_field(unet, "ddpm", cfg), cond, un, w)
        new = solvers.sample_diffusion_teacher(v_fn, x0, cfg, steps, path=new_path)
        assert _rel(new, old) < 5e-6, (w, _rel(new, old))
        assert len(new_path) == len(old_path) == steps + 1
        assert new_path[0][0] == 0.0 and new_path[0][1] is x0  # the noise itself first, as today
        for (t_old, s_old), (t_new, s_new) in zip(old_path, new_path):
            assert abs(t_old - t_new) < 1e-7 and _rel(s_new, s_old) < 5e-6
        assert new_path[-1][0] == 1.0


def test_the_conversion_feeds_the_unet_the_grids_discrete_timesteps(tiny_teacher):
    unet, cfg = tiny_teacher
    seen = []

    class Recording(torch.nn.Module):
        def forward(self, x, timestep, encoder_hidden_states):
            seen.append(timestep.to(torch.float64))
            return unet(x, timestep, encoder_hidden_states=encoder_hidden_states)

    v = DiffusionVelocity(Recording(), torch.as_tensor(solvers.dpm_solver_scheduler(cfg, 4).alphas_cumprod))
    ts = solvers.teacher_time_grid(cfg, 4)
    solvers.sample_dpmpp_2m(lambda x, t: v(x, t, torch.zeros(2, 3, 8)), noise.seeded_noise([0, 1], (4, 8, 8)), ts)
    want = solvers.dpm_solver_scheduler(cfg, 4).timesteps.to(torch.float64)  # 999, 749, 499, 249
    torch.testing.assert_close(torch.stack([s[0] for s in seen]), want, atol=1e-3, rtol=0)
    # the first grid time is the schedule's noisiest level, where the boundary rule starts: equal to float rounding
    assert abs(float(ts[0]) - v.t_min) < 1e-12


def test_teacher_time_grid_is_diffusers_sigmas_in_flow_time(sd_schedule):
    sched = solvers.dpm_solver_scheduler(sd_schedule, 25)
    ts = solvers.teacher_time_grid(sd_schedule, 25)
    assert ts.dtype == torch.float64 and ts.shape == (26,) and float(ts[-1]) == 1.0
    torch.testing.assert_close(ts, 1.0 / (1.0 + sched.sigmas.to(torch.float64)), atol=1e-7, rtol=0)
    assert bool((ts[1:] > ts[:-1]).all())
    with pytest.raises(ValueError, match="steps must be a whole number"):
        solvers.teacher_time_grid(sd_schedule, 0)
