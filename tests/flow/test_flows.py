"""Exact-case tests of instaflow.flow (and the teacher conversion in velocity.DiffusionVelocity).

Convention under test: t = 0 noise x0, t = 1 data x1, x_t = t x1 + (1 - t) x0, target x1 - x0.
"""

from __future__ import annotations

import math
import types

import pytest
import torch
from torch import nn

from instaflow.flow import diffusion
from instaflow.flow import guidance
from instaflow.flow import paths
from instaflow.flow import solvers
from instaflow.flow import straightness
from instaflow.flow import time_sampling
from instaflow.flow import velocity


@pytest.fixture
def alphas_cumprod(sd_schedule) -> torch.Tensor:
    """SD's DDPM alphas_cumprod as diffusers computes them: float32, (1000,)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(sd_schedule).alphas_cumprod


# --- interpolation and targets ------------------------------------------------------------

def test_interpolate_endpoints_and_velocity_target():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    assert torch.equal(paths.interpolate(x0, x1, torch.zeros(3)), x0)
    assert torch.equal(paths.interpolate(x0, x1, torch.ones(3)), x1)
    t = torch.tensor([0.0, 0.25, 1.0])  # per-sample times broadcast over (C, H, W)
    xt = paths.interpolate(x0, x1, t)
    torch.testing.assert_close(xt[1], 0.25 * x1[1] + 0.75 * x0[1])
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[2], x1[2])
    torch.testing.assert_close(paths.velocity_target(x0, x1), x1 - x0)
    # The target is the time derivative of the interpolation (it is linear in t).
    h = 1e-3
    dxdt = (paths.interpolate(x0, x1, t + h) - paths.interpolate(x0, x1, t)) / h
    torch.testing.assert_close(dxdt, paths.velocity_target(x0, x1), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(paths.rf_unet_timestep(torch.tensor([0.0, 1.0])), torch.tensor([1000.0, 0.0]))


@pytest.mark.parametrize("solver", [solvers.sample_euler, solvers.sample_heun])
def test_straight_flow_reaches_x1_in_one_step(solver):
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    calls = []

    def oracle(x, t):  # the straight-line velocity of known pairs
        calls.append(t.clone())
        assert t.shape == (5,)
        return x1 - x0

    path = []
    out = solver(oracle, x0, solvers.time_grid(1), path=path)
    torch.testing.assert_close(out, x1, atol=1e-6, rtol=0)
    # the path holds the solver's states in flow time, x0 first: [(0, x0), (1, x1)]
    assert [t for t, _ in path] == [0.0, 1.0] and path[0][1] is x0 and torch.equal(path[1][1], out)
    assert float(calls[0][0]) == 0.0
    if solver is solvers.sample_heun:
        assert len(calls) == 2 and float(calls[1][0]) == 1.0
    g = solvers.time_grid(4, 0.2, 0.6)
    assert g.dtype == torch.float64 and len(g) == 5
    torch.testing.assert_close(g, torch.tensor([0.2, 0.3, 0.4, 0.5, 0.6], dtype=torch.float64))


# --- Gaussian -> Gaussian flow: a curved flow with a closed-form velocity and solution -----

MU = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
S = 2.0


def _gauss_k(t: torch.Tensor, s: float = S) -> torch.Tensor:
    return (t * s**2 - (1 - t)) / (t**2 * s**2 + (1 - t) ** 2)


def _gauss_velocity(x: torch.Tensor, t: torch.Tensor, mu=MU, s: float = S) -> torch.Tensor:
    """E[x1 - x0 | x_t] for x0 ~ N(0, I), x1 ~ N(mu, s^2 I), independent coupling."""
    t = t.to(torch.float64).reshape(-1, 1)
    return mu + _gauss_k(t, s) * (x - t * mu)


def test_gaussian_velocity_closed_form_matches_regression():
    """Check the closed form itself: least-squares regression of x1 - x0 on x_t, per coordinate."""
    g = torch.Generator().manual_seed(0)
    n, mu, s = 400_000, 1.5, 2.0
    x0 = torch.randn(n, generator=g, dtype=torch.float64)
    x1 = mu + s * torch.randn(n, generator=g, dtype=torch.float64)
    for t in (0.2, 0.5, 0.8):
        xt, y = t * x1 + (1 - t) * x0, x1 - x0
        xc, yc = xt - xt.mean(), y - y.mean()
        slope = float((xc * yc).sum() / (xc * xc).sum())
        intercept = float(y.mean() - slope * xt.mean())
        k = float(_gauss_k(torch.tensor(t), s))
        assert slope == pytest.approx(k, abs=1e-2)
        assert intercept == pytest.approx(mu - k * t * mu, abs=2e-2)  # v = mu + k (x_t - t mu)


@pytest.mark.parametrize("solver,steps,tol,order", [(solvers.sample_euler, 2000, 1e-2, 1), (solvers.sample_heun, 200, 2e-4, 2)])
def test_gaussian_flow_maps_x0_to_affine_image(solver, steps, tol, order):
    """The exact ODE solution is x_t = t mu + sqrt(t^2 s^2 + (1-t)^2) x0, so x0 -> mu + s x0 at t = 1.

    Observed max errors: Euler 2000 steps 4.8e-3, Heun 200 steps 7.7e-5.
    """
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(64, 4, generator=g, dtype=torch.float64)
    exact = MU + S * x0
    out = solver(lambda x, t: _gauss_velocity(x, t), x0, solvers.time_grid(steps))
    err = (out - exact).abs().max().item()
    assert err < tol
    # ...and the error shrinks at the solver's order: halving the steps multiplies it by 2^order.
    half = solver(lambda x, t: _gauss_velocity(x, t), x0, solvers.time_grid(steps // 2))
    ratio = (half - exact).abs().max().item() / err
    assert ratio == pytest.approx(2**order, rel=0.1)


# --- time samplers ------------------------------------------------------------------------

def _ecdf(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (x[None, :] <= q[:, None]).double().mean(1)


def test_time_samplers_shapes_ranges_and_distributions():
    n = 200_000
    q = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    samples = {name: time_sampling.sample_t(name, n, generator=torch.Generator().manual_seed(0)) for name in time_sampling.TIME_SAMPLERS}
    for name, t in samples.items():
        assert t.shape == (n,), name
        assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0, name
        assert abs(float(t.mean()) - 0.5) < 5e-3, name  # all three are symmetric about 1/2

    # uniform: CDF(q) = q
    assert (_ecdf(samples["uniform"], q) - q).abs().max() < 5e-3
    # logit-normal(0, 1): CDF(q) = Phi(logit q); mass concentrated in the middle
    normal = torch.distributions.Normal(0.0, 1.0)
    cdf_ln = normal.cdf(torch.log(q / (1 - q)).float()).double()
    assert (_ecdf(samples["logit_normal"], q) - cdf_ln).abs().max() < 5e-3
    ln = samples["logit_normal"]
    assert ((ln > 0.25) & (ln < 0.75)).double().mean() > 0.7  # 2 Phi(logit 0.75) - 1 = 0.728 (uniform: 0.5)
    # u-shaped, p(t) ~ cosh(a (t - 1/2)), a = 4: exact CDF, and more mass near 0 and 1 than in the middle
    a = 4.0
    cdf_u = 0.5 * (torch.expm1(a * q) + (math.expm1(a) - torch.expm1(a * (1 - q)))) / math.expm1(a)
    assert (_ecdf(samples["u_shaped"], q) - cdf_u).abs().max() < 5e-3
    u = samples["u_shaped"]
    ends, middle = ((u < 0.1) | (u > 0.9)).double().mean(), ((u > 0.4) & (u < 0.6)).double().mean()
    assert ends > 0.3 and middle < 0.12 and ends > 2.5 * middle  # uniform would give 0.2 and 0.2

    # reproducible from a generator; keyword arguments reach the sampler
    for name in time_sampling.TIME_SAMPLERS:
        a1 = time_sampling.sample_t(name, 7, generator=torch.Generator().manual_seed(3))
        a2 = time_sampling.sample_t(name, 7, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a1, a2)
    shifted = time_sampling.sample_t("logit_normal", n, generator=torch.Generator().manual_seed(0), mean=1.0, std=0.5)
    assert float(shifted.median()) == pytest.approx(1 / (1 + math.exp(-1.0)), abs=5e-3)


def test_sample_t_rejects_unknown_name():
    with pytest.raises(ValueError, match=r"unknown time distribution 'cosine'.*logit_normal.*u_shaped.*uniform"):
        time_sampling.sample_t("cosine", 4)


# --- diffusion <-> flow -------------------------------------------------------------------

def test_alpha_bar_and_t_are_inverse_and_scale_is_consistent(alphas_cumprod):
    t = torch.linspace(0.001, 0.999, 999, dtype=torch.float64)
    ab = diffusion.t_to_alpha_bar(t)
    torch.testing.assert_close(diffusion.alpha_bar_to_t(ab), t, atol=1e-12, rtol=0)
    ac = alphas_cumprod.double()
    torch.testing.assert_close(diffusion.t_to_alpha_bar(diffusion.alpha_bar_to_t(ac)), ac, atol=1e-12, rtol=1e-12)
    assert float(diffusion.alpha_bar_to_t(torch.tensor(0.5))) == pytest.approx(0.5)
    assert torch.all(ab[1:] > ab[:-1])  # monotone: more signal at larger t

    g = torch.Generator().manual_seed(0)
    x1, eps = torch.randn(6, 3, 2, 2, generator=g, dtype=torch.float64), torch.randn(6, 3, 2, 2, generator=g, dtype=torch.float64)
    tt = torch.tensor([0.01, 0.1, 0.3, 0.5, 0.9, 0.99], dtype=torch.float64)
    abt = diffusion.t_to_alpha_bar(tt)
    c = diffusion.flow_to_diffusion_scale(tt)
    torch.testing.assert_close(c, abt.sqrt() + (1 - abt).sqrt())
    x_t = paths.interpolate(eps, x1, tt)
    x_s = abt.sqrt().view(-1, 1, 1, 1) * x1 + (1 - abt).sqrt().view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(c.view(-1, 1, 1, 1) * x_t, x_s, atol=1e-12, rtol=1e-12)


def test_diffusion_to_velocity_all_parameterizations_agree(sd_schedule):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(sd_schedule)
    g = torch.Generator().manual_seed(0)
    x1, eps = torch.randn(4, 4, 3, 3, generator=g), torch.randn(4, 4, 3, 3, generator=g)
    timesteps = torch.tensor([0, 250, 600, 999])
    ab = sched.alphas_cumprod[timesteps]
    x_s = sched.add_noise(x1, eps, timesteps)  # diffusers' own forward process
    outputs = {
        "epsilon": eps,
        "v_prediction": sched.get_velocity(x1, eps, timesteps),  # diffusers' own v target
        "sample": x1,
    }
    for pt, out in outputs.items():
        x1_hat, eps_hat = diffusion.diffusion_to_x1_eps(out, x_s, ab, pt)
        torch.testing.assert_close(x1_hat, x1, atol=2e-4, rtol=1e-4, msg=pt)
        torch.testing.assert_close(eps_hat, eps, atol=2e-4, rtol=1e-4, msg=pt)
        torch.testing.assert_close(diffusion.diffusion_to_velocity(out, x_s, ab, pt), x1 - eps, atol=2e-4, rtol=1e-4,
                                   msg=pt)
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion.diffusion_to_velocity(eps, x_s, ab, "flow")


def test_ddpm_timestep_exact_at_schedule_and_interpolates_between(alphas_cumprod):
    ac = alphas_cumprod
    idx = diffusion.ddpm_timestep(ac, ac)
    assert idx.dtype == torch.float64
    torch.testing.assert_close(idx, torch.arange(1000, dtype=torch.float64), atol=1e-9, rtol=0)
    ac64 = ac.double()
    torch.testing.assert_close(diffusion.ddpm_timestep(ac64, ac64), torch.arange(1000, dtype=torch.float64), atol=1e-9,
                               rtol=0)
    # Through flow time and back (what DiffusionVelocity does): still the integer index.
    round_trip = diffusion.ddpm_timestep(diffusion.t_to_alpha_bar(diffusion.alpha_bar_to_t(ac64)), ac64)
    torch.testing.assert_close(round_trip, torch.arange(1000, dtype=torch.float64), atol=1e-6, rtol=0)
    # Halfway in log-SNR between two schedule points -> halfway between their indices.
    log_snr = (ac64 / (1 - ac64)).log()
    k = torch.tensor([0, 10, 500, 998])
    for frac in (0.25, 0.5, 0.75):
        q = (1 - frac) * log_snr[k] + frac * log_snr[k + 1]
        ab = torch.sigmoid(q)  # ab / (1 - ab) = exp(q)
        torch.testing.assert_close(diffusion.ddpm_timestep(ab, ac64), k.double() + frac, atol=1e-6, rtol=0)
    # Monotone decreasing in the noise level, clamped outside the schedule.
    t = torch.linspace(0.02, 0.98, 500, dtype=torch.float64)
    ts = diffusion.ddpm_timestep(diffusion.t_to_alpha_bar(t), ac64)
    assert torch.all(ts[1:] <= ts[:-1])
    torch.testing.assert_close(diffusion.ddpm_timestep(torch.tensor([0.99999, 1e-6], dtype=torch.float64), ac64),
                               torch.tensor([0.0, 999.0], dtype=torch.float64))


class _RecordingUNet(nn.Module):
    """Stands in for a UNet: records its inputs, returns the exact output for a known (x1, eps) pair."""

    def __init__(self, x1, eps, t, prediction_type):
        super().__init__()
        self.x1, self.eps, self.t, self.pt = x1, eps, t, prediction_type
        self.seen = []

    def forward(self, x_s, timestep, encoder_hidden_states):
        self.seen.append((x_s.clone(), timestep.clone(), encoder_hidden_states))
        ab = diffusion.t_to_alpha_bar(self.t).view(-1, 1, 1, 1)
        if self.pt == "epsilon":
            out = self.eps
        else:  # v = sqrt(ab) eps - sqrt(1 - ab) x1 (Salimans & Ho 2022)
            out = ab.sqrt() * self.eps - (1 - ab).sqrt() * self.x1
        return types.SimpleNamespace(sample=out)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_velocity_feeds_the_unet_the_right_timestep_and_scale(prediction_type, alphas_cumprod):
    """At t = alpha_bar_to_t(ac[k]) the teacher UNet sees timestep k and x_s = sqrt(ab) x1 + sqrt(1-ab) eps."""
    ac = alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x1, eps = torch.randn(4, 4, 2, 2, generator=g, dtype=torch.float64), torch.randn(4, 4, 2, 2, generator=g,
                                                                                      dtype=torch.float64)
    k = torch.tensor([0, 137, 500, 999])
    t = diffusion.alpha_bar_to_t(ac.double()[k])
    stub = _RecordingUNet(x1, eps, t, prediction_type)
    teacher = velocity.DiffusionVelocity(stub, ac, prediction_type)
    states = torch.randn(4, 3, 8, dtype=torch.float64)
    v = teacher(paths.interpolate(eps, x1, t), t, states)
    x_s, timestep, seen_states = stub.seen[0]
    torch.testing.assert_close(timestep.double(), k.double(), atol=1e-4, rtol=0)
    ab = ac.double()[k].view(-1, 1, 1, 1)
    torch.testing.assert_close(x_s, ab.sqrt() * x1 + (1 - ab).sqrt() * eps, atol=1e-10, rtol=1e-10)
    assert seen_states is states
    torch.testing.assert_close(v, x1 - eps, atol=1e-8, rtol=1e-8)


# --- THE KEY TEST: the converted teacher reproduces diffusers' DDIM -----------------------

class _TimeModulatedUNet(nn.Module):
    """The tiny random UNet, with its output scaled by a smooth function of the timestep.

    A random UNet barely depends on its timestep, so on its own a wrong time mapping would go
    unnoticed; this makes the teacher strongly time dependent (still a fixed function of (x, timestep)).
    """

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, timestep, encoder_hidden_states):
        tau = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        gain = (1 + 0.5 * torch.sin(3 * math.pi * tau / 1000)).to(x.dtype).view(-1, 1, 1, 1)
        return types.SimpleNamespace(sample=self.unet(x, timestep, encoder_hidden_states=encoder_hidden_states).sample * gain)


DDIM_STEPS, FLOW_STEPS, MID = 500, 250, 499  # trailing spacing visits 999, 997, ..., 1; states land on odd timesteps


def _run_ddim(teacher, scheduler_config, x_T, states, prediction_type):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config, timestep_spacing="trailing", set_alpha_to_one=True,
                                      prediction_type=prediction_type)
    sched.set_timesteps(DDIM_STEPS)
    assert int(sched.timesteps[0]) == 999 and sched.init_noise_sigma == 1.0
    x, mid = x_T * sched.init_noise_sigma, None
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(teacher(x, t, encoder_hidden_states=states).sample, t, x).prev_sample
            if int(t) - 1000 // DDIM_STEPS == MID:
                mid = x
    return x, mid


def _run_flow(v_model, alphas_cumprod, x_T, states):
    ac = alphas_cumprod.double()
    t_T, t_mid, t_end = (float(diffusion.alpha_bar_to_t(ac[i])) for i in (999, MID, 0))
    x = x_T / diffusion.flow_to_diffusion_scale(torch.tensor(t_T)).float()
    v_fn = lambda x, t: v_model(x, t, states)  # noqa: E731
    n1 = round(FLOW_STEPS * (t_mid - t_T) / (t_end - t_T))
    x = solvers.sample_euler(v_fn, x, solvers.time_grid(n1, t_T, t_mid))
    mid = x * diffusion.flow_to_diffusion_scale(torch.tensor(t_mid)).float()  # back to DDPM scaling
    x = solvers.sample_euler(v_fn, x, solvers.time_grid(FLOW_STEPS - n1, t_mid, t_end))
    with torch.no_grad():  # DDIM's last step to alpha = 1 returns its x1 prediction: the same jump to t = 1
        x = x + (1 - t_end) * v_fn(x, torch.full((x.shape[0],), t_end))
    return x, mid


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_converted_teacher_matches_diffusers_ddim(tiny_sd_components, prediction_type):
    """Euler in flow time on DiffusionVelocity == diffusers' DDIM (eta 0) on the same UNet and noise.

    Observed (250 flow steps vs 500 DDIM steps): relative error 2.7e-3 (eps) and 1.6e-3 (v) at the end,
    2.7e-3 / 1.1e-3 half way. Mutations observed to fail: UNet timestep 1000 (1 - t) instead of the
    schedule's (final 2.9e-2 / 1.6e-2, mid 3.3e-2 / 3.7e-2), v = x1_hat - x_s (>4e-2), no x_s scaling
    (>5e-2), flipped velocity sign (>0.6). Small timestep offsets are caught exactly by the stub test above.
    """
    comps = tiny_sd_components
    teacher = _TimeModulatedUNet(comps["unet"]).eval()
    from diffusers import DDPMScheduler

    ac = DDPMScheduler.from_config(comps["scheduler_config"]).alphas_cumprod
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(2, 4, 8, 8, generator=g)
    states = torch.randn(2, 5, comps["unet"].config.cross_attention_dim, generator=g)

    ddim_out, ddim_mid = _run_ddim(teacher, comps["scheduler_config"], x_T, states, prediction_type)
    flow_out, flow_mid = _run_flow(velocity.DiffusionVelocity(teacher, ac, prediction_type), ac, x_T, states)

    assert torch.isfinite(flow_out).all()
    assert _rel(flow_mid, ddim_mid) < 6e-3
    assert _rel(flow_out, ddim_out) < 6e-3
    # The ODE really moved the sample: agreement is not just "both stayed at the start".
    assert _rel(ddim_out, x_T) > 0.5


# --- straightness -------------------------------------------------------------------------

def test_straightness_zero_for_straight_flow_positive_for_curved():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(8, 3, 4, 4, generator=g), torch.randn(8, 3, 4, 4, generator=g)
    path = []
    out = solvers.sample_euler(lambda x, t: x1 - x0, x0, solvers.time_grid(10), path=path)
    assert len(path) == 11 and path[0][1] is x0 and torch.equal(path[-1][1], out)
    # for Euler, the path's finite differences are exactly the velocities it used (up to float rounding)
    for _, dt, v in straightness.path_velocities(path):
        assert dt == pytest.approx(0.1) and torch.allclose(v, x1 - x0, atol=1e-5)
    s = straightness.straightness(path)
    r = straightness.path_length_ratio(path)
    assert s.shape == (8,) and r.shape == (8,)
    torch.testing.assert_close(s, torch.zeros(8), atol=1e-10, rtol=0)
    torch.testing.assert_close(r, torch.ones(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(straightness.straightness(path, skip_first=True), torch.zeros(8), atol=1e-10, rtol=0)

    # Gaussian flow with s != 1: curved. S = mean(x0^2) * int_0^1 (s - 1 - sigma'(t))^2 dt exactly,
    # since v(t) = mu + sigma'(t) x0 along the path and x1 - x0 = mu + (s - 1) x0.
    x0g = torch.randn(16, 4, generator=g, dtype=torch.float64)
    path = []
    solvers.sample_euler(lambda x, t: _gauss_velocity(x, t), x0g, solvers.time_grid(2000), path=path)
    sg = straightness.straightness(path)
    tq = torch.linspace(0, 1, 20001, dtype=torch.float64)
    sigma_prime = (tq * S**2 - (1 - tq)) / (tq**2 * S**2 + (1 - tq) ** 2).sqrt()
    integral = torch.trapezoid((S - 1 - sigma_prime) ** 2, tq)
    torch.testing.assert_close(sg, x0g.pow(2).mean(1) * integral, rtol=1e-2, atol=1e-4)
    assert torch.all(sg > 1e-2)
    assert torch.all(straightness.path_length_ratio(path) > 1.001)
    # one step of 2000 left out moves S by little (x0 and x1 stay the path's ends)
    torch.testing.assert_close(straightness.straightness(path, skip_first=True), sg, rtol=1e-2, atol=1e-4)


# --- guidance -----------------------------------------------------------------------------

def _toy_model(calls):
    def model(x, t, states):
        calls.append(x.shape[0])
        scale = states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return torch.tanh(x * scale) + t.view(-1, 1, 1, 1) * x
    return model


def test_guided_runs_only_conditional_pass_when_w_is_1_or_there_is_no_uncond():
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 2, 4, 4, generator=g), torch.rand(3, generator=g)
    cond, uncond = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    # (w = 0.5 with uncond applies the formula: tests/flow/test_guidance.py)
    for w, unc in [(1.0, uncond), (4.0, None), (0.5, None)]:
        calls = []
        fn = guidance.guided(_toy_model(calls), cond, unc, w)
        out = fn(x, t)
        assert calls == [3]
        torch.testing.assert_close(out, _toy_model([])(x, t, cond))


def test_guided_equals_cfg_combine_of_separate_passes(tiny_sd_components):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 2, 4, 4, generator=g), torch.rand(3, generator=g)
    cond, uncond = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    calls = []
    out = guidance.guided(_toy_model(calls), cond, uncond, 3.0)(x, t)
    assert calls == [6]  # one doubled batch
    ref = guidance.cfg_combine(_toy_model([])(x, t, uncond), _toy_model([])(x, t, cond), 3.0)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(guidance.cfg_combine(torch.zeros(2), torch.ones(2), 7.5), torch.full((2,), 7.5))

    # Same with a real (tiny) UNet velocity field.
    rf = velocity.RectifiedFlowVelocity(tiny_sd_components["unet"])
    xs = torch.randn(2, 4, 8, 8, generator=g)
    ts, c, u = torch.rand(2, generator=g), torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    with torch.no_grad():
        out = guidance.guided(rf, c, u, 2.5)(xs, ts)
        ref = guidance.cfg_combine(rf(xs, ts, u), rf(xs, ts, c), 2.5)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(guidance.guided(rf, c, u, 1.0)(xs, ts), rf(xs, ts, c))
