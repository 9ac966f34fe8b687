"""EMA: once per optimizer step, so gradient accumulation does not change the average."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from callbacks.ema import EMA


class _Linear(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1)


def _fit(batch_size: int, accumulate: int, steps: int) -> tuple[EMA, _Linear]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps * 8, 4, generator=g)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=batch_size, shuffle=False)
    ema = EMA(decay=0.9, attr="net", warmup=True)
    model = _Linear()
    L.Trainer(max_steps=steps, accumulate_grad_batches=accumulate, callbacks=[ema], logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              accelerator="cpu", devices=1).fit(model, data)
    return ema, model


def test_accumulating_two_batches_of_b_gives_the_ema_of_one_batch_of_2b():
    ema_acc, model_acc = _fit(batch_size=4, accumulate=2, steps=5)
    ema_big, model_big = _fit(batch_size=8, accumulate=1, steps=5)
    # same optimizer steps on the same samples: same weights, and the EMA saw each step once
    for a, b in zip(model_acc.net.parameters(), model_big.net.parameters()):
        torch.testing.assert_close(a, b)
    assert ema_acc.num_updates == ema_big.num_updates == 5
    for a, b in zip(ema_acc.shadow, ema_big.shadow):
        torch.testing.assert_close(a, b)
    # and the average is not the weights themselves (it lags them)
    assert not torch.allclose(ema_big.shadow[0], model_big.net.weight)


class _TwoNetworks(_Linear):
    """A student ``net`` and a second trained network (a loss's critic), named by ``contracts.TrainsNetworks``."""

    def __init__(self) -> None:
        super().__init__()
        self.critic = torch.nn.Linear(1, 1)

    def trained_networks(self):
        return {"student": self.net, "loss.critic": self.critic}


def test_the_ema_finds_the_student_through_the_contract_and_averages_it_only():
    import pytest

    model = _TwoNetworks()
    ema = EMA(decay=0.9)  # no attr: the first of trained_networks()
    assert ema.network(model) is model.net and ema.attr == "unet"  # attr: the legacy checkpoint prefix default
    ema._init_shadow(model)
    assert [s.shape for s in ema.shadow] == [p.shape for p in model.net.parameters()]
    assert EMA(attr="critic").network(model) is model.critic  # attr still names an attribute (existing YAMLs)
    with pytest.raises(AttributeError, match="trained_networks"):
        EMA().network(L.LightningModule())
