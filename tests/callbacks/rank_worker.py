"""One rank of a small multi-rank Lightning fit on CPU (gloo), started as torchrun or srun would start it.

    LOCAL_RANK=r NODE_RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p \
        python -m tests.callbacks.rank_worker CASE ROOT SHARDS

Lightning sees ``LOCAL_RANK`` and lets the caller create the processes, so each rank's output and exit
status are its own. The module is a stand-in (one linear layer; "images" are the real val images of
the prompts' seeds, or black ones), so a fit takes seconds. CASE:

- ``alignment``: ``Quality`` (embedded alignment, per object count) on ``BlockPrompts``, whose
  three-object scenes all fall in rank 0's block; writes ``quality.jsonl``.
- ``reference``: the same, but building the FID reference (rank 0 alone) raises a planted error.
- ``export``: ``Export(weights=best)`` whose export (rank 0 alone) raises a planted error.

Not a test module (no ``test_`` prefix): ``tests/callbacks/test_quality_ranks.py`` and
``tests/callbacks/test_export_safety.py`` launch it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from instaflow.collective import end_process_group
from instaflow.evaluation.quality import PromptSet, ShardPrompts, TextImageScore
from tests.callbacks.test_quality import TinyFeatures  # the fixed 4-feature stand-in for Inception

N = 8  # prompts (and reference images): 2 ranks score 4 each
PLANTED_REFERENCE = "planted: reference shard 00007.tar does not decode"
PLANTED_EXPORT = "planted: no space left on device while writing unet/"


class BlockPrompts(ShardPrompts):
    """Of the 2n samples, the n/2 with the most objects, then the n/2 with the fewest: on 2 ranks, rank 0's block
    holds the three-object scenes and rank 1's only one-object scenes (so their per-count names differ).

    Prompt i keeps the noise seed of its sample's position in key order, so ``StandIn`` finds its image."""

    def load(self) -> PromptSet:
        samples = self._read()
        by_count = sorted(range(len(samples)), key=lambda i: -len(samples[i]["meta"]["scene"]["objects"]))
        order = by_count[:self.n // 2] + by_count[len(by_count) - (self.n - self.n // 2):]
        return PromptSet([samples[i]["caption"] for i in order], [self.seed + i for i in order],
                         [samples[i]["meta"] for i in order])


class BrokenReference(BlockPrompts):
    """``BlockPrompts`` whose reference images fail to decode (read by rank 0 alone, for the FID reference)."""

    def reference_images(self) -> torch.Tensor:
        raise ValueError(PLANTED_REFERENCE)


def stand_in_images(shards: str, seeds: list[int]) -> torch.Tensor:
    """The real val image of each even seed, a black image for each odd one: alignment differs per prompt."""
    from data.laion import LaionStream

    stream = LaionStream(shards, resolution=32, resampled=False, shuffle_buffer=0, require_meta=True,
                         split_by_rank=False)  # every rank reads every sample
    real = [(s["pixel_values"] + 1) / 2 for s in sorted(stream, key=lambda s: s["key"])]
    return torch.stack([real[s] if s % 2 == 0 else torch.zeros_like(real[s]) for s in seeds])


class StandIn(L.LightningModule):
    """One linear layer; ``contracts.SamplesImages`` through ``stand_in_images``; exports like ``FlowStudent``."""

    solver_tag = "euler"

    def __init__(self, shards: str = "", fail_export: bool = False) -> None:
        super().__init__()
        self.shards, self.fail_export = shards, fail_export
        self.unet = torch.nn.Linear(2, 2)

    def training_step(self, batch, batch_idx):
        loss = self.unet(batch[0]).pow(2).mean()
        self.log("score", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def sample_images(self, prompts, steps, guidance, seeds, batch_size=256) -> torch.Tensor:
        return stand_in_images(self.shards, list(seeds))

    def export_unet(self) -> torch.nn.Module:
        return self.unet

    def trainable_names(self) -> list[str]:
        return [n for n, _ in self.unet.named_parameters()]

    def unet_from_state(self, state: dict) -> torch.nn.Module:
        net = torch.nn.Linear(2, 2)
        net.load_state_dict(state)
        return net

    def export(self, dirpath: str, unet: torch.nn.Module | None = None) -> Path:
        if self.fail_export:
            raise OSError(PLANTED_EXPORT)
        (Path(dirpath) / "model_index.json").write_text("{}")
        return Path(dirpath)


def quality(prompts_cls: type, shards: str, root: Path, score: TextImageScore | None = None):
    from callbacks.quality import Quality
    from instaflow.evaluation.quality import EmbeddedAlignment

    return Quality(prompts_cls(shards, n=N, resolution=32), TinyFeatures(),
                   [score or EmbeddedAlignment("assets/embedded-evaluator")], batch_size=4,
                   cache_dir=str(root / "reference"))


def callbacks(case: str, shards: str, root: Path) -> list:
    from callbacks.export import Export
    from lightning.pytorch.callbacks import ModelCheckpoint

    if case == "alignment":
        return [quality(BlockPrompts, shards, root)]
    if case == "reference":
        return [quality(BrokenReference, shards, root)]
    if case == "export":
        return [ModelCheckpoint(dirpath=str(root / "ckpt"), monitor="score", save_top_k=1, every_n_train_steps=1),
                Export(dirpath=str(root / "export"), weights="best")]
    raise ValueError(f"unknown case {case!r}")


def main(case: str, root: str, shards: str) -> None:
    from lightning.pytorch.loggers import CSVLogger

    print(f"READY {time.time():.3f}", flush=True)
    torch.set_num_threads(1)
    root_path = Path(root)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, limit_val_batches=0,
                        logger=CSVLogger(str(root_path / "logs"), name="run"), enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=case == "export",
                        callbacks=callbacks(case, shards, root_path), default_root_dir=str(root_path))
    data = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2)
    trainer.fit(StandIn(shards, fail_export=case == "export"), data)
    print(f"DONE rank {trainer.global_rank}", flush=True)
    end_process_group()  # as the CLI does: without it the exit could abort in gloo's threads (status -6)


def launch(case: str, root: Path, shards: str, world: int = 2, timeout: float = 180) -> list[dict]:
    """Start ``world`` ranks of CASE and wait; per rank: its exit status, output, and seconds from READY to exit."""
    import os
    import subprocess

    from tests.conftest import ROOT, free_port

    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(world), "NODE_RANK": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.callbacks.rank_worker", case, str(root), shards],
                              cwd=ROOT, env={**env, "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # a hang: end every rank, report it
            for q in procs:
                q.kill()
            raise AssertionError(f"{case}: the ranks did not end within {timeout} s (a collective hang)") from None
        ended = time.time()
        ready = [float(line.split()[1]) for line in text.splitlines() if line.startswith("READY ")]
        out.append({"rc": p.returncode, "out": text, "seconds": ended - ready[0] if ready else float("inf")})
    return out


if __name__ == "__main__":
    main(*sys.argv[1:4])
