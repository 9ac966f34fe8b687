"""Losses as objects (issue 25): each loss's value on fixed tensors, the LPIPS objects against the old perceptual
path, one optimizer with a parameter group per trained network, and the old embedded defaults unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from instaflow.flow import losses as flow_losses
from instaflow.losses import L2, LPIPS, LPIPSHuber, Loss, NetworkOptimizer, ParamGroup, PseudoHuber, adamw_param_groups
from instaflow.models import perceptual
from tests.conftest import ROOT, TINY_VAE


def _pair(shape=(3, 4, 8, 8)):
    g = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


def test_l2_and_pseudo_huber_equal_the_functions_bit_for_bit():
    pred, target = _pair()
    assert torch.equal(L2()(pred, target), F.mse_loss(pred.float(), target.float()))
    assert torch.equal(L2()(pred, target), flow_losses.l2_loss(pred, target))
    for c in (0.03, 1.0):
        assert torch.equal(PseudoHuber(c)(pred, target), flow_losses.pseudo_huber_loss(pred, target, c))
    # pseudo-Huber by hand: sqrt(mean d^2 + c^2) - c per sample, then the batch mean
    d2 = (pred - target).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(PseudoHuber(0.5)(pred, target), ((d2 + 0.25).sqrt() - 0.5).mean())
    assert L2().trained_networks() == {} and L2().param_groups() == []
    assert PseudoHuber(0.1).description() == {"class_path": "instaflow.losses.PseudoHuber",
                                              "init_args": {"c": 0.1}}
    assert L2().description() == {"class_path": "instaflow.losses.L2"}


@pytest.fixture(scope="module")
def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(**TINY_VAE).eval().requires_grad_(False)


def _old_perceptual(vae, pred, target, size=None):
    """The perceptual path of DistillTraining before issue 25 (decode, resize, target without a graph)."""
    loss = perceptual.PerceptualLoss("vae_encoder", vae=vae)
    decode = lambda z: perceptual.resize_images(vae.decode(z / vae.config.scaling_factor).sample, size)  # noqa: E731
    with torch.no_grad():
        t = decode(target)
    return loss(decode(pred), t)


@pytest.mark.parametrize("size", [None, 24])
def test_lpips_equals_the_old_perceptual_path(tiny_vae, size):
    pred, target = _pair()
    loss = LPIPS("vae_encoder", size=size)
    with pytest.raises(RuntimeError, match="not configured"):
        loss(pred, target)
    loss.configure(vae=tiny_vae)
    assert torch.equal(loss(pred, target), _old_perceptual(tiny_vae, pred, target, size))
    assert loss(target, target).item() == pytest.approx(0.0, abs=1e-6)
    # the VAE is the stage's: not registered twice, not trained, not in the loss's state
    assert not any(k.startswith("_vae") for k in loss.state_dict()) and loss.trained_networks() == {}
    p = pred.clone().requires_grad_(True)
    loss(p, target).backward()
    assert p.grad.abs().sum() > 0  # gradients reach the prediction through the decoder
    with pytest.raises(ValueError, match="VAE"):
        LPIPS("vae_encoder").configure(vae=None)


def test_lpips_huber_is_the_weighted_sum_and_its_time_hook_weights_the_huber_term(tiny_vae):
    pred, target = _pair()
    loss = LPIPSHuber("vae_encoder", c=0.1, huber_weight=2.0, lpips_weight=0.5)
    loss.configure(vae=tiny_vae)
    lp = _old_perceptual(tiny_vae, pred, target)
    want = 2.0 * flow_losses.pseudo_huber_loss(pred, target, 0.1) + 0.5 * lp
    torch.testing.assert_close(loss(pred, target), want)

    class Weighted(LPIPSHuber):  # what issue 30's time weighting overrides
        def huber_time_weight(self, t):
            return 1 - t

    w = Weighted("vae_encoder", c=0.1)
    w.configure(vae=tiny_vae)
    t = torch.tensor([0.0, 0.5, 1.0])
    per = flow_losses.pseudo_huber_per_sample(pred, target, 0.1)
    torch.testing.assert_close(w(pred, target, t), (torch.tensor([1.0, 0.5, 0.0]) * per).mean() + lp)


def test_a_param_group_updates_exactly_as_a_separate_adamw():
    """One AdamW with a group per network == one AdamW per network (AdamW is per-parameter)."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(3, 2)
    a2, b2 = torch.nn.Linear(5, 3), torch.nn.Linear(3, 2)
    a2.load_state_dict(a.state_dict())
    b2.load_state_dict(b.state_dict())
    groups = [ParamGroup("unet", list(a.parameters()), 1e-2, weight_decay=0.1, warmup_steps=3),
              ParamGroup("loss.critic", list(b.parameters()), 3e-2, betas=(0.5, 0.9), weight_decay=0.0,
                         warmup_steps=0)]
    cfg = adamw_param_groups(groups)
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert [g["name"] for g in opt.param_groups] == ["unet", "loss.critic"]
    sep = [adamw_param_groups([ParamGroup("x", list(a2.parameters()), 1e-2, weight_decay=0.1, warmup_steps=3)]),
           adamw_param_groups([ParamGroup("y", list(b2.parameters()), 3e-2, betas=(0.5, 0.9), warmup_steps=0)])]
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    for _ in range(4):
        for o in [opt] + [s["optimizer"] for s in sep]:
            o.zero_grad()
        b(a(x)).pow(2).mean().backward()
        b2(a2(x)).pow(2).mean().backward()
        opt.step(), sched.step()
        for s in sep:
            s["optimizer"].step(), s["lr_scheduler"]["scheduler"].step()
    for p, q in zip(list(a.parameters()) + list(b.parameters()), list(a2.parameters()) + list(b2.parameters())):
        assert torch.equal(p, q)
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 3e-2]  # warm-up 3 steps done; the critic had none
    with pytest.raises(ValueError, match="unique"):
        adamw_param_groups([ParamGroup("a", list(a.parameters())), ParamGroup("a", list(b.parameters()))])


def test_a_loss_network_without_optimizer_settings_is_refused():
    class Bad(Loss):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(2, 2)

        def trained_networks(self):
            return {"net": self.net}

    with pytest.raises(NotImplementedError, match="optimizer_for"):
        Bad().param_groups()
    with pytest.raises(ValueError, match="betas"):
        NetworkOptimizer(betas=(0.9, 1.5))


# -- the old embedded defaults give the same values (recorded with the code before issue 25) ------------------

OLD = {  # float.hex of the loss on _embedded_batch(), old loss_type settings (commit 01aa62f, 1 thread)
    "distill_l2": "0x1.452a020000000p+0",           # loss_type: l2 (embedded/distill.yaml)
    "distill_huber": "0x1.18c3520000000p+0",        # loss_type: pseudo_huber, huber_c: 0.03
    "distill_perceptual": "0x1.d467300000000p+2",   # loss_type: perceptual, perceptual_features: vae_encoder
    "reflow_l2": "0x1.baa15a0000000p+1",            # embedded/reflow.yaml (u_shaped t)
}
OLD_STEPS = (["0x1.452a020000000p+0", "0x1.4069160000000p+0", "0x1.3806300000000p+0"], "0x1.0428fefb264dep+12")


def _embedded_batch() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"x0": torch.randn(4, 4, 8, 8, generator=g), "x1": torch.randn(4, 4, 8, 8, generator=g),
            "caption": ["a red circle", "a blue square", "a green triangle", "two yellow stars"], "skipped": 0}


EMBEDDED = str(ROOT / "assets" / "embedded-sd")


@pytest.mark.parametrize("name,loss", [("distill_l2", None), ("distill_l2", L2()), ("distill_huber", PseudoHuber(0.03)),
                                       ("distill_perceptual", LPIPS("vae_encoder"))])
def test_embedded_distillation_losses_equal_the_old_ones_bit_for_bit(name, loss):
    from lightning_modules.distill import DistillTraining

    m = DistillTraining(init=EMBEDDED, parameterization="velocity_wrapper", loss=loss)
    m.configure_model()
    assert m.loss(_embedded_batch(), torch.Generator().manual_seed(0), 0.0).item() == float.fromhex(OLD[name])


def test_embedded_reflow_loss_and_three_optimizer_steps_equal_the_old_ones_bit_for_bit():
    from lightning_modules.distill import DistillTraining
    from lightning_modules.reflow import ReflowTraining

    m = ReflowTraining(init=EMBEDDED, parameterization="velocity_wrapper", time_distribution="u_shaped",
                       caption_dropout=0.1)
    m.configure_model()
    assert m.loss(_embedded_batch(), torch.Generator().manual_seed(0), 0.0).item() == float.fromhex(OLD["reflow_l2"])
    # the default loss through the new one-group optimizer: the same losses and weights as the old AdamW
    m = DistillTraining(init=EMBEDDED, parameterization="velocity_wrapper", lr=1e-4, warmup_steps=50)
    m.configure_model()
    cfg = m.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert len(opt.param_groups) == 1 and "name" not in opt.param_groups[0]  # logged lr keeps its name
    values = []
    for i in range(3):
        opt.zero_grad()
        loss = m.loss(_embedded_batch(), torch.Generator().manual_seed(i), 0.0)
        loss.backward()
        opt.step(), sched.step()
        values.append(float.hex(loss.item()))
    assert values == OLD_STEPS[0]
    assert float.hex(sum(p.double().sum().item() for p in m.unet.parameters())) == OLD_STEPS[1]


class _Recording(Loss):
    def __init__(self, images: bool) -> None:
        super().__init__()
        self.compares_images, self.seen = images, None

    def forward(self, pred, target, t=None):
        self.seen = (pred.detach(), target, t)
        return pred.float().pow(2).mean()


def test_reflow_gives_an_image_loss_the_x1_estimate_and_a_plain_loss_the_velocities(tiny_sd_folder):
    from instaflow.flow.time_sampling import sample_t
    from lightning_modules.reflow import ReflowTraining
    from tests.conftest import tiny_coupling_batch

    batch = tiny_coupling_batch()
    x0, x1 = batch["x0"], batch["x1"]
    t = sample_t("uniform", 4, generator=torch.Generator().manual_seed(0))
    seen = {}
    for images in (False, True):
        m = ReflowTraining(str(tiny_sd_folder), parameterization="flow", loss=_Recording(images))
        m.configure_model()
        m.loss(batch, torch.Generator().manual_seed(0), 0.0)
        seen[images] = m.criterion.seen
        torch.testing.assert_close(m.criterion.seen[2], t)  # every loss gets the time
    v_pred, v_target, _ = seen[False]
    torch.testing.assert_close(v_target, x1 - x0)
    x1_hat, target, _ = seen[True]
    x_t = t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0
    assert torch.equal(target, x1)
    torch.testing.assert_close(x1_hat, x_t + (1 - t.view(-1, 1, 1, 1)) * v_pred)  # one Euler step from t to 1
