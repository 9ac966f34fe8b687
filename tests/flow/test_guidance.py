"""Guidance settings: every finite w >= 0 other than 1 applies v_u + w (v_c - v_u); NaN, inf and w < 0 are refused.

Before issue #24, any w <= 1 (and NaN, which fails every comparison) silently sampled the conditional
model alone, so a guidance of 0.5 in a YAML was ignored.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from instaflow.flow import guidance, solvers
from instaflow.flow.velocity import velocity_field


def _field(x, t, states):
    """A tiny velocity field whose value depends on the text states: v = states' mean * (1 + x) + t."""
    return states.mean(dim=(1, 2)).view(-1, 1, 1, 1) * (1 + x) + t.view(-1, 1, 1, 1)


@pytest.mark.parametrize("w", [0.0, 0.5, 0.75, 2.0])
def test_guidance_below_and_above_one_samples_with_the_cfg_formula(w):
    x = torch.tensor([[[[0.5]]], [[[-1.0]]]])  # (2, 1, 1, 1)
    t = torch.tensor([0.25, 0.5])
    cond, uncond = torch.full((2, 3, 4), 2.0), torch.full((2, 3, 4), -1.0)
    got = guidance.guided(_field, cond, uncond, w)(x, t)
    # by hand: v_c = 2 (1 + x) + t, v_u = -(1 + x) + t, v = v_u + w (v_c - v_u) = (3 w - 1)(1 + x) + t
    want = torch.tensor([(3 * w - 1) * 1.5 + 0.25, (3 * w - 1) * 0.0 + 0.5]).view(2, 1, 1, 1)
    torch.testing.assert_close(got, want)


def test_one_euler_step_at_w_half_is_the_hand_computed_update():
    x0, cond, uncond = torch.zeros(1, 1, 1, 1), torch.full((1, 2, 2), 2.0), torch.full((1, 2, 2), -1.0)
    x1 = solvers.sample_euler(guidance.guided(_field, cond, uncond, 0.5), x0, solvers.time_grid(1))
    assert float(x1) == pytest.approx(0.5)  # v(0, 0) = (3 * 0.5 - 1) * 1 + 0 = 0.5, dt = 1


@pytest.mark.parametrize("w", [math.nan, math.inf, -math.inf, -0.5, None])
def test_nan_inf_and_negative_guidance_are_refused_naming_the_key(w):
    with pytest.raises(ValueError, match="grid_guidance must be a"):
        guidance.check_guidance(w, "grid_guidance")
    with pytest.raises(ValueError, match="guidance"):
        guidance.guided(_field, torch.ones(1, 2, 2), torch.zeros(1, 2, 2), w)


class _StatesUNet(torch.nn.Module):
    """Predicts epsilon = the mean of its text states, whatever the input: CFG's effect is exact arithmetic."""

    def forward(self, x, t, encoder_hidden_states):
        return SimpleNamespace(sample=encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1).expand_as(x).clone())


def test_dpm_solver_applies_guidance_below_one(sd_schedule):
    x0 = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    cond, uncond = torch.full((2, 3, 4), 2.0), torch.full((2, 3, 4), -1.0)
    teacher = velocity_field(_StatesUNet(), "ddpm", sd_schedule)

    def solve(c, u, w):  # the DDPM teacher's DPM-Solver++ through the velocity conversion
        return solvers.sample_diffusion_teacher(guidance.guided(teacher, c, u, w), x0, sd_schedule, 3)

    got = solve(cond, uncond, 0.5)
    # eps_u + 0.5 (eps_c - eps_u) = -1 + 0.5 * 3 = 0.5: the same as the conditional model fed states of mean 0.5
    want = solve(torch.full((2, 3, 4), 0.5), None, 1.0)
    torch.testing.assert_close(got, want)
    plain = solve(cond, uncond, 1.0)
    assert not torch.allclose(got, plain)  # guidance 0.5 is not the conditional model alone


def test_the_sampler_encodes_the_unconditional_states_for_every_w_but_1(tiny_sd_folder):
    from instaflow.models.sampler import TextToImage

    model = TextToImage.from_pretrained(str(tiny_sd_folder))
    assert model.encode(["a cat"], 0.5)[1] is not None and model.encode(["a cat"], 0.0)[1] is not None
    assert model.encode(["a cat"], 1.0)[1] is None


@pytest.mark.parametrize("steps", [0, -1, 2.5, math.nan, math.inf, True])
def test_solver_steps_must_be_whole_and_at_least_one(steps):
    with pytest.raises(ValueError, match="grid_steps must be a whole number"):
        solvers.check_steps(steps, "grid_steps")
    assert solvers.check_steps(25.0) == 25
