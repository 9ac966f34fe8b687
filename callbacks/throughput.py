"""Training throughput: samples/s, step time, peak memory and model FLOP utilisation (MFU) of the UNet.

Add it to an experiment's callbacks (it is in no base or embedded YAML, so committed runs are unchanged):

    trainer:
      callbacks:
        - class_path: callbacks.throughput.Throughput
          init_args: {peak_flops: null}     # null: looked up from the device name (PEAK_FLOPS) or the CPU rule

or on the command line: ``--trainer.callbacks+=callbacks.throughput.Throughput``.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from instaflow.contracts import TrainsNetworks, student_network
from instaflow.evaluation.throughput import batch_size_of, peak_flops_for, peak_memory_mb, unet_forward_flops


class Throughput(Callback):
    """Logs ``throughput/*`` every training step (the trainer's log_every_n_steps decides what is written).

    - ``step_time_s``: wall time of one training step (forward, backward, optimizer), CUDA-synchronised;
      waiting for data and validation are outside it, so samples/s is the compute throughput.
    - ``samples_per_s``: global batch (local batch x world size) / step time; ``samples_per_s_per_device``.
    - ``peak_memory_mb``: CUDA max_memory_allocated on a GPU, peak RSS of the process on CPU.
    - ``tflops_per_device`` and ``mfu``: the UNet's FLOPs per sample, measured once at fit start with
      ``torch.utils.flop_counter.FlopCounterMode`` on one sample, times ``train_flops_factor`` (3: forward +
      backward ~ 2x forward; frozen text encoder/VAE and the optimizer are not counted), times the samples
      per second of this device, over ``peak_flops`` (FLOP/s; None: PEAK_FLOPS by device name, bf16 dense,
      or the CPU rule; an unknown GPU logs no MFU).

    Args:
        unet_attr: the module attribute holding the UNet; null: the student of ``trained_networks()``
            (``contracts.TrainsNetworks``), else ``unet``.
        tokens: text tokens of the cross-attention states; None: the module's ``text_encoder.max_length`` or 77.
    """

    def __init__(self, peak_flops: float | None = None, unet_attr: str | None = None, tokens: int | None = None,
                 train_flops_factor: float = 3.0) -> None:
        self.peak_flops = peak_flops
        self.unet_attr = unet_attr
        self.tokens = tokens
        self.train_flops_factor = train_flops_factor
        self.flops_per_sample: int | None = None
        self._t0 = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.unet_attr is None and isinstance(pl_module, TrainsNetworks):
            unet = student_network(pl_module)
        else:
            unet = getattr(pl_module, self.unet_attr or "unet", None)
        if unet is None:
            raise AttributeError(f"Throughput: {type(pl_module).__name__} has no '{self.unet_attr or 'unet'}' (nor "
                                 "trained_networks(), contracts.TrainsNetworks) to count FLOPs of; set "
                                 "init_args.unet_attr to the attribute that holds the UNet")
        tokens = self.tokens or getattr(getattr(pl_module, "text_encoder", None), "max_length", None) or 77
        self.flops_per_sample = unet_forward_flops(unet, tokens, pl_module.device)
        if self.peak_flops is None:
            self.peak_flops = peak_flops_for(pl_module.device)
            if self.peak_flops is None:
                rank_zero_warn(f"Throughput: no peak FLOP/s known for {torch.cuda.get_device_name(pl_module.device)}; "
                               "MFU is not logged (set init_args.peak_flops)")

    def _sync(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._sync(pl_module.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        self._sync(pl_module.device)
        step_time = time.perf_counter() - self._t0
        local = batch_size_of(batch) / step_time
        values = {"step_time_s": step_time, "samples_per_s": local * trainer.world_size,
                  "samples_per_s_per_device": local, "peak_memory_mb": peak_memory_mb(pl_module.device)}
        if self.flops_per_sample:
            achieved = self.flops_per_sample * self.train_flops_factor * local  # FLOP/s of this device
            values["tflops_per_device"] = achieved / 1e12
            if self.peak_flops:
                values["mfu"] = achieved / self.peak_flops
        for k, v in values.items():
            pl_module.log(f"throughput/{k}", float(v), on_step=True, on_epoch=False, batch_size=1)
