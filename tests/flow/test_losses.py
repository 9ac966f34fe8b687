"""Distillation losses: pseudo-Huber's two regimes, the perceptual loss's behaviour, LPIPS offline."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY_VAE
from instaflow.flow import losses as flow_losses
from instaflow.models import perceptual


def test_pseudo_huber_is_quadratic_near_zero_and_linear_far_away():
    c = 0.03
    target = torch.zeros(4, 2, 3, 3)
    assert flow_losses.pseudo_huber_loss(target, target, c).item() == 0.0
    small = torch.full_like(target, 1e-3)  # d2 = 1e-6 << c^2: loss ~ d2 / (2c)
    assert flow_losses.pseudo_huber_loss(small, target, c).item() == pytest.approx(1e-6 / (2 * c), rel=1e-3)
    big = torch.full_like(target, 10.0)  # d2 = 100 >> c^2: loss ~ sqrt(d2) - c
    assert flow_losses.pseudo_huber_loss(big, target, c).item() == pytest.approx(10.0 - c, rel=1e-4)
    # per-sample: one outlier sample costs linearly, not quadratically (L2 would be dominated by it)
    mixed = target.clone()
    mixed[0] = 10.0
    assert flow_losses.pseudo_huber_loss(mixed, target, c).item() == pytest.approx((10.0 - c) / 4, rel=1e-4)
    assert flow_losses.l2_loss(mixed, target).item() == pytest.approx(100.0 / 4)


def test_pseudo_huber_gradient_is_bounded():
    target = torch.zeros(2, 8)
    grads = []
    for scale in (1.0, 100.0):
        pred = torch.full((2, 8), scale, requires_grad=True)
        flow_losses.pseudo_huber_loss(pred, target).backward()
        grads.append(pred.grad.norm().item())
    assert grads[1] == pytest.approx(grads[0], rel=1e-3)  # far away, the pull no longer grows with the error


def test_perceptual_loss_on_vae_encoder_features():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE).eval()
    loss = perceptual.PerceptualLoss("vae_encoder", vae=vae)
    assert all(not p.requires_grad for p in loss.parameters())  # the feature net is frozen
    target = torch.rand(3, 3, 16, 16) * 2 - 1
    assert loss(target, target).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.rand(3, 3, 16, 16) * 2 - 1
    far = [loss(target + a * (other - target), target).item() for a in (0.1, 0.5, 1.0)]
    assert 0 < far[0] < far[1] < far[2]  # moving away from the target costs more
    pred = other.clone().requires_grad_(True)
    loss(pred, target).backward()
    assert pred.grad.abs().sum() > 0  # gradients reach the student's pixels
    with pytest.raises(ValueError, match="needs the VAE"):
        perceptual.PerceptualLoss("vae_encoder")
    with pytest.raises(ValueError, match="unknown perceptual features"):
        perceptual.PerceptualLoss("evaluator")


def test_lpips_offline_fails_with_a_clear_message(monkeypatch):
    import urllib.error

    import lpips

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(lpips, "LPIPS", offline)
    with pytest.raises(RuntimeError, match=r"LPIPS-vgg needs torchvision's pretrained VGG.*hub/checkpoints.*vae_encoder"):
        perceptual.PerceptualLoss("lpips_vgg")


def test_distillation_rejects_the_removed_loss_type_and_a_non_loss():
    from lightning_modules.distill import DistillTraining

    with pytest.raises(ValueError, match="loss_type was removed"):
        DistillTraining(init="unused", loss_type="l1")
    with pytest.raises(TypeError, match="loss must be an instaflow.losses.Loss"):
        DistillTraining(init="unused", loss="l2")
