"""The velocity conversion below the schedule's noisiest level t_min (flow.velocity.BOUNDARIES).

The kept choice ("x1_consistent") feeds the UNet x0 itself at t = 0 (c(0) = 1, as DPM-Solver++ does)
at its noisiest timestep, and returns the velocity from the actual x_t to the UNet's x1 estimate;
above t_min every choice is the analytic conversion.
"""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from instaflow.flow import diffusion, velocity
from instaflow.flow.diffusion import SD_SCHEDULE


class _Recorder(nn.Module):
    """A fixed 'UNet': epsilon = 0.5 x_s + 0.1 (any affine map will do); records what it was fed."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x_s, timestep, encoder_hidden_states):
        self.seen.append((x_s.clone(), timestep.clone()))
        return types.SimpleNamespace(sample=0.5 * x_s + 0.1)


@pytest.fixture(scope="module")
def ac():
    return diffusion.alphas_cumprod(SD_SCHEDULE)


def _field(ac, boundary):
    return velocity.DiffusionVelocity(_Recorder(), ac, "epsilon", boundary)


def test_the_kept_boundary_is_x1_consistent():
    assert velocity.BOUNDARY == "x1_consistent"
    with pytest.raises(ValueError, match="boundary must be one of"):
        velocity.DiffusionVelocity(_Recorder(), torch.linspace(0.99, 0.01, 10), "epsilon", "clamp")


def test_at_t0_the_unet_sees_x0_itself_at_its_noisiest_timestep(ac):
    x0 = torch.randn(3, 4, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.zeros(3, dtype=torch.float64)
    states = torch.zeros(3, 1, 1, dtype=torch.float64)
    seen = {}
    for b in velocity.BOUNDARIES:
        f = _field(ac, b)
        f(x0, t, states)
        seen[b] = f.unet.seen[0]
    t_min = diffusion.alpha_bar_to_t(ac[-1].double())
    c_tmin = diffusion.flow_to_diffusion_scale(t_min)
    assert 1.05 < float(c_tmin) < 1.08  # SD's schedule: the first version's 1.066 x0
    torch.testing.assert_close(seen["scale_t_min"][0], x0 * c_tmin)
    torch.testing.assert_close(seen["scale_t"][0], x0)
    torch.testing.assert_close(seen["x1_consistent"][0], x0)
    for b in velocity.BOUNDARIES:  # all at the UNet's noisiest timestep
        torch.testing.assert_close(seen[b][1].double(), torch.full((3,), 999.0, dtype=torch.float64), atol=1e-3, rtol=0)


def test_x1_consistent_points_from_x_t_to_the_unets_x1_estimate_below_t_min(ac):
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(4, 4, 2, 2, dtype=torch.float64, generator=g)
    t = torch.tensor([0.0, 0.01, 0.03, 0.05], dtype=torch.float64)  # all below t_min ~ 0.064
    states = torch.zeros(4, 1, 1, dtype=torch.float64)
    f = _field(ac, "x1_consistent")
    v = f(x_t, t, states)
    x_s, _ = f.unet.seen[0]
    ab = diffusion.t_to_alpha_bar(torch.full((4,), f.t_min, dtype=torch.float64))
    x1_hat, _ = diffusion.diffusion_to_x1_eps(0.5 * x_s + 0.1, x_s, ab, "epsilon")
    # one Euler step from (t, x_t) to 1 lands on the UNet's x1 estimate
    torch.testing.assert_close(x_t + (1 - t).view(-1, 1, 1, 1) * v, x1_hat)


def test_above_t_min_every_boundary_is_the_analytic_conversion(ac):
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(3, 4, 2, 2, dtype=torch.float64, generator=g)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    states = torch.zeros(3, 1, 1, dtype=torch.float64)
    vs = [_field(ac, b)(x_t, t, states) for b in velocity.BOUNDARIES]
    for v in vs[1:]:
        assert torch.equal(v, vs[0])
