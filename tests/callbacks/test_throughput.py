"""Throughput callback: throughput/* scalars in TensorBoard, positive and consistent with each other."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY_UNET


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


class TinyFlow:
    """A LightningModule with a tiny diffusers UNet regressing a random velocity (only what Throughput needs)."""

    @staticmethod
    def build():
        import lightning as L
        from diffusers import UNet2DConditionModel

        class Module(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.unet = None

            def configure_model(self):
                if self.unet is None:
                    torch.manual_seed(0)
                    self.unet = UNet2DConditionModel(**TINY_UNET)

            def training_step(self, batch, batch_idx):
                x_t, states = batch["x_t"], batch["states"]  # (B, 4, 8, 8), (B, 6, 8)
                t = torch.full((x_t.shape[0],), 500.0)
                return (self.unet(x_t, t, encoder_hidden_states=states).sample - batch["v"]).pow(2).mean()

            def configure_optimizers(self):
                return torch.optim.SGD(self.unet.parameters(), lr=1e-3)

        return Module()


def _loader(batch_size: int, n: int = 48):
    g = torch.Generator().manual_seed(0)
    data = [{"x_t": torch.randn(4, 8, 8, generator=g), "states": torch.randn(6, 8, generator=g),
             "v": torch.randn(4, 8, 8, generator=g), "caption": "a red circle"} for _ in range(n)]
    return torch.utils.data.DataLoader(data, batch_size=batch_size)


def test_throughput_logs_consistent_positive_values(tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from callbacks.throughput import Throughput
    from instaflow.evaluation.throughput import unet_forward_flops

    batch, peak = 8, 1e12
    cb = Throughput(peak_flops=peak, tokens=6)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=TensorBoardLogger(tmp_path, name="tp"),
                        callbacks=[cb], log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    model = TinyFlow.build()
    trainer.fit(model, _loader(batch))

    # FLOPs per sample: one measured forward of the UNet on one sample with 6 tokens, as an independent count
    assert cb.flops_per_sample == unet_forward_flops(model.unet, 6, torch.device("cpu")) > 0
    rng = torch.get_rng_state()
    two = unet_forward_flops(model.unet, 12, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng)  # measuring does not move the training run's random stream
    assert two > cb.flops_per_sample  # more text tokens, more cross-attention FLOPs: the count sees the inputs

    s = _scalars(Path(trainer.logger.log_dir))
    keys = {"step_time_s", "samples_per_s", "samples_per_s_per_device", "peak_memory_mb", "tflops_per_device", "mfu"}
    assert {f"throughput/{k}" for k in keys} <= set(s)
    steps = [st for st, _ in s["throughput/step_time_s"]]
    assert len(steps) == 6
    for k in keys:
        vals = np.array([v for _, v in s[f"throughput/{k}"]])
        assert np.isfinite(vals).all() and (vals > 0).all(), (k, vals)
    step_time = np.array([v for _, v in s["throughput/step_time_s"]])
    sps = np.array([v for _, v in s["throughput/samples_per_s"]])
    np.testing.assert_allclose(sps, batch / step_time, rtol=1e-4)  # one device: global == local
    np.testing.assert_allclose(np.array([v for _, v in s["throughput/samples_per_s_per_device"]]), sps, rtol=1e-6)
    tflops = np.array([v for _, v in s["throughput/tflops_per_device"]])
    np.testing.assert_allclose(tflops, cb.flops_per_sample * 3 * sps / 1e12, rtol=1e-4)
    mfu = np.array([v for _, v in s["throughput/mfu"]])
    np.testing.assert_allclose(mfu, tflops * 1e12 / peak, rtol=1e-4)
    assert (mfu < 1).all()
    # peak RSS on CPU: at least the size of this process's UNet weights, at most all of the machine's memory
    mem = np.array([v for _, v in s["throughput/peak_memory_mb"]])
    assert (np.diff(mem) >= 0).all() and mem[-1] > sum(p.numel() * 4 for p in model.unet.parameters()) / 2**20


def test_cpu_peak_rule_and_missing_unet_message(tmp_path):
    import lightning as L

    from callbacks.throughput import Throughput
    from instaflow.evaluation.throughput import CPU_FLOPS_PER_THREAD, batch_size_of, peak_flops_for

    assert peak_flops_for(torch.device("cpu")) == torch.get_num_threads() * CPU_FLOPS_PER_THREAD
    assert batch_size_of({"caption": ["a", "b"], "x1": torch.zeros(2, 4)}) == 2
    with pytest.raises(ValueError, match="cannot find a tensor"):
        batch_size_of({"caption": ["a"]})

    class NoUnet(L.LightningModule):
        pass

    with pytest.raises(AttributeError, match="unet_attr"):
        Throughput().on_fit_start(None, NoUnet())


def test_throughput_finds_the_student_through_the_contract():
    import lightning as L
    from diffusers import UNet2DConditionModel

    from callbacks.throughput import Throughput

    class Student(L.LightningModule):  # no attribute named "unet": the contract names the network
        def __init__(self):
            super().__init__()
            self.net = UNet2DConditionModel(**TINY_UNET)

        def trained_networks(self):
            return {"student": self.net}

    cb = Throughput(peak_flops=1e12)
    cb.on_fit_start(None, Student())
    assert cb.flops_per_sample and cb.flops_per_sample > 0
