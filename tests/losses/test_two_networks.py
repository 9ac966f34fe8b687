"""A loss that trains a network of its own (issue 25): a toy critic with its own AdamW parameter group trains beside
the student, is checkpointed with its optimizer state, survives save -> new Trainer -> resume, and is sharded by
FSDP2 through the student's own code (``FlowStudent.configure_criterion``, ``sharding.shard_network``)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from instaflow.flow.losses import l2_loss
from instaflow.losses import Loss, NetworkOptimizer
from tests.conftest import one_rank_device_mesh, tiny_coupling_batch

CRITIC_LR, STUDENT_LR = 3e-2, 1e-3


class ToyCritic(Loss):
    """L2 to x1, plus a critic trained on the student's detached outputs (a fake-score model's role in DMD):
    it learns the residual x1 - x1_hat; the student is pulled by the critic's (gradient-free) correction."""

    def __init__(self, weight: float = 0.5) -> None:
        super().__init__()
        self.weight = weight
        self.critic: nn.Module | None = None
        self.terms: list[tuple[float, float]] = []  # (student's L2, critic's loss) per call

    def configure(self, vae=None) -> None:
        if self.critic is None:
            with torch.random.fork_rng():
                torch.manual_seed(0)
                self.critic = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 4, 3, padding=1))

    def trained_networks(self) -> dict[str, nn.Module]:
        return {"critic": self.critic}

    def optimizer_for(self, name: str) -> NetworkOptimizer:
        return NetworkOptimizer(lr=CRITIC_LR, betas=(0.5, 0.9), weight_decay=0.01)

    def forward(self, pred, target, t=None):
        critic_term = l2_loss(self.critic(pred.detach()), (target - pred).detach())  # gradients: the critic only
        with torch.no_grad():
            correction = self.critic(pred)
        fit = l2_loss(pred, target)
        self.terms.append((fit.item(), critic_term.item()))
        return fit + self.weight * l2_loss(pred, (pred + correction).detach()) + critic_term


class Couplings(torch.utils.data.Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, i):
        return {**tiny_coupling_batch(), "skipped": 0}


def _student(init, **kw):
    from lightning_modules.distill import DistillTraining

    return DistillTraining(init=str(init), parameterization="flow", loss=ToyCritic(), lr=STUDENT_LR, warmup_steps=0,
                           grid_steps=(1,), **kw)


def _trainer(tmp_path, steps: int, callbacks=()) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=list(callbacks))


def _loader():
    return torch.utils.data.DataLoader(Couplings(), batch_size=None)


def _flat(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in net.parameters()]).clone()


def _critic_state(model, opt) -> list[dict]:
    """The AdamW state (step, moments) of each critic parameter."""
    return [{k: v.clone() for k, v in opt.state[p].items()} for p in model.criterion.critic.parameters()]


class Snapshot(L.Callback):
    """The critic's weights and AdamW state when training starts (after a resume restored them)."""

    def on_train_start(self, trainer, pl_module):
        self.critic = _flat(pl_module.criterion.critic)
        self.state = _critic_state(pl_module, trainer.optimizers[0])


def test_a_loss_network_trains_checkpoints_and_resumes_with_its_optimizer_state(tiny_sd_folder, tmp_path):
    from callbacks.ema import EMA
    from instaflow.contracts import TrainsNetworks, student_network

    model = _student(tiny_sd_folder)
    ema = EMA(decay=0.5)
    trainer = _trainer(tmp_path, 6, [ema])
    model.configure_model()
    critic0, student0 = _flat(model.criterion.critic), _flat(model.unet)
    trainer.fit(model, _loader())

    # one optimizer: the student's group and the critic's, each with its own settings
    opt = trainer.optimizers[0]
    assert [(g["name"], g["lr"], tuple(g["betas"]), g["weight_decay"]) for g in opt.param_groups] == [
        ("unet", STUDENT_LR, (0.9, 0.999), 0.0), ("loss.critic", CRITIC_LR, (0.5, 0.9), 0.01)]
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in model.criterion.critic.parameters()}
    # both networks moved; the critic learned the residual and the student's L2 fell
    assert not torch.equal(_flat(model.criterion.critic), critic0) and not torch.equal(_flat(model.unet), student0)
    fit, critic = zip(*model.criterion.terms)
    assert fit[-1] < fit[0] and critic[-1] < critic[0]
    # the contract: the student first, the loss's network after it; the EMA averages the student only
    assert isinstance(model, TrainsNetworks) and list(model.trained_networks()) == ["unet", "loss.critic"]
    assert student_network(model) is model.unet and len(ema.shadow) == len(model.trainable_names())

    # the checkpoint holds the critic's weights and its AdamW state, and nothing frozen
    path = tmp_path / "toy.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    sd = ckpt["state_dict"]
    for name, p in model.criterion.critic.named_parameters():
        assert torch.equal(sd[f"criterion.critic.{name}"], p.detach())
    assert any(k.startswith("unet.") for k in sd)
    assert all(k.startswith(("unet.", "criterion.critic.")) for k in sd)
    saved_opt = ckpt["optimizer_states"][0]
    assert [g["name"] for g in saved_opt["param_groups"]] == ["unet", "loss.critic"]
    critic_ids = saved_opt["param_groups"][1]["params"]
    live = _critic_state(model, opt)
    for i, want in zip(critic_ids, live):
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(saved_opt["state"][i][k], want[k])
    assert float(live[0]["step"]) == 6
    saved_critic = _flat(model.criterion.critic)

    # killed: a new module and a new Trainer from the checkpoint restore the critic and its AdamW state, then go on
    resumed, snap = _student(tiny_sd_folder), Snapshot()
    trainer2 = _trainer(tmp_path, 9, [EMA(decay=0.5), snap])
    trainer2.fit(resumed, _loader(), ckpt_path=str(path))
    assert torch.equal(snap.critic, saved_critic)
    for got, want in zip(snap.state, live):
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(got[k], want[k])
    assert trainer2.global_step == 9 and float(_critic_state(resumed, trainer2.optimizers[0])[0]["step"]) == 9
    assert not torch.equal(_flat(resumed.criterion.critic), saved_critic)  # training continued

    # 9 steps without the kill give the same networks (the resume lost nothing: weights, moments, step counts)
    straight = _student(tiny_sd_folder)
    _trainer(tmp_path, 9, [EMA(decay=0.5)]).fit(straight, _loader())
    torch.testing.assert_close(_flat(resumed.criterion.critic), _flat(straight.criterion.critic), rtol=0, atol=0)
    torch.testing.assert_close(_flat(resumed.unet), _flat(straight.unet), rtol=0, atol=0)


def test_a_loss_network_is_sharded_by_fsdp2_through_the_students_code(tiny_sd_folder):
    from torch.distributed.tensor import DTensor

    from instaflow.models import sharding

    ref = _student(tiny_sd_folder)
    ref.configure_model()
    batch = tiny_coupling_batch()
    ref_cfg = ref.configure_optimizers()
    ref_loss = ref.loss(batch, torch.Generator(), 0.0)
    ref_loss.backward()
    ref_cfg["optimizer"].step()
    with one_rank_device_mesh() as mesh:
        model = _student(tiny_sd_folder)
        model._device_mesh = mesh
        model.configure_model()
        critic = model.criterion.critic
        assert sharding.is_sharded(model.unet) and sharding.is_sharded(critic)
        assert all(isinstance(p, DTensor) for p in critic.parameters())
        cfg = model.configure_optimizers()
        assert [g["name"] for g in cfg["optimizer"].param_groups] == ["unet", "loss.critic"]
        loss = model.loss(batch, torch.Generator(), 0.0)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        loss.backward()
        cfg["optimizer"].step()
        full = torch.cat([p.full_tensor().flatten() for p in critic.parameters()])
        torch.testing.assert_close(full, _flat(ref.criterion.critic), rtol=1e-5, atol=1e-6)
        # a sharded module keeps its whole state in a (distributed) checkpoint: the critic included
        ckpt = {"state_dict": model.state_dict()}
        model.on_save_checkpoint(ckpt)
        assert any(k.startswith("criterion.critic.") for k in ckpt["state_dict"])
        with pytest.raises(ValueError, match="no trainable parameters"):
            sharding.shard_network(nn.Linear(2, 2).requires_grad_(False), mesh)


class NaNInCritic(L.Callback):
    """A NaN in one critic gradient at step 1 (finite loss); records both networks after every batch."""

    def __init__(self):
        self.after: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == 1:
            next(pl_module.criterion.critic.parameters()).grad.view(-1)[0] = float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append((_flat(pl_module.unet), _flat(pl_module.criterion.critic)))


def test_a_nan_in_the_loss_networks_gradient_skips_the_step_for_every_network(tiny_sd_folder, tmp_path):
    model, cb = _student(tiny_sd_folder), NaNInCritic()
    _trainer(tmp_path, 3, [cb]).fit(model, _loader())
    (s0, c0), (s1, c1), (s2, c2) = cb.after
    assert torch.equal(s1, s0) and torch.equal(c1, c0)  # step 1 not applied, to the student either
    assert not torch.equal(s2, s1) and not torch.equal(c2, c1) and torch.isfinite(c2).all()
    assert model.nonfinite_steps_skipped == 1
