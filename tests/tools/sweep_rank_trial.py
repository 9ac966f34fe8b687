"""A sweep trial's run on 2 ranks (``entry:`` of the pruning test), started by a worker with ``--launcher torchrun``:

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.tools.sweep_rank_trial fit \
        --x 2.0 --root DIR --trainer.num_nodes 1 --trainer.devices 2

A real Lightning fit (DDP, gloo, CPU) of a one-layer module whose ``val/loss`` is ``(x - 0.3)^2 + 1/step`` on
every rank, validated every 2 steps of 8, with the real ``callbacks.optuna_trial.OptunaTrial`` and a
``ModelCheckpoint`` in ROOT/ckpt. Each rank prints ``RANK r STOPPED AT STEP s``. Not a test module.
"""

from __future__ import annotations

import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from callbacks.optuna_trial import OptunaTrial
from instaflow.collective import end_process_group


class Curve(L.LightningModule):
    def __init__(self, x: float) -> None:
        super().__init__()
        self.x = x
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, _):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, _):
        value = (self.x - 0.3) ** 2 + 1.0 / max(self.global_step, 1)
        self.log("val/loss", torch.tensor(value), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main(argv: list[str]) -> None:
    opts = {k.lstrip("-"): v for k, v in zip(argv[1::2], argv[2::2])}
    torch.set_num_threads(1)
    root = opts["root"]
    data = DataLoader(TensorDataset(torch.randn(32, 2)), batch_size=2)
    trainer = L.Trainer(accelerator="cpu", devices=int(opts["trainer.devices"]), strategy="ddp", max_steps=8,
                        val_check_interval=2, limit_val_batches=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root,
                        callbacks=[OptunaTrial(), ModelCheckpoint(dirpath=f"{root}/ckpt", save_last=True)])
    trainer.fit(Curve(float(opts["x"])), data, data)
    print(f"RANK {trainer.global_rank} STOPPED AT STEP {trainer.global_step}", flush=True)
    end_process_group()  # as the CLI does: an exit with a live gloo group can abort


if __name__ == "__main__":
    main(sys.argv[1:])
