"""Read coupling shards written by ``callbacks.pair_writer.CouplingWriter``: (x0, x1, caption).

The format (members, dtypes, validation) is ``data.couplings``'s; x0 is regenerated from the stored
seed unless the shard stores it. The reading machinery (resampling, splitting, counted skips) is the
LAION reader's; only the decoding differs (a training stream whose shards hold no usable coupling
raises ``EmptyStreamError`` like the LAION reader's).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from data.couplings import Skip, decode_coupling
from data.couplings import read_npy as _npy  # noqa: F401  (its former home; tests and callers import it here)
from data.laion import LaionStream, check_missing_shards, ignore_sigterm
from data.stream_state import STATE_KEY, ResumableTrainStream


class CouplingStream(LaionStream):
    """Samples ``{key, caption, x0, x1, seed, skipped}`` (latents float32, (4, h, w))."""

    def _decode(self, raw: dict) -> dict | None:
        sample = decode_coupling(raw)
        if isinstance(sample, Skip):
            return self._skip(sample.reason, sample.detail)
        return {**sample, "url": raw.get("__url__"), "worker": self._worker, "meta": None}


def collate_pairs(samples: list[dict]) -> dict:
    batch = {
        "key": [s["key"] for s in samples], "caption": [s["caption"] for s in samples],
        "seed": [s["seed"] for s in samples], "skipped": sum(s["skipped"] for s in samples),
        "x0": torch.stack([s["x0"] for s in samples]),  # (B, 4, h, w)
        "x1": torch.stack([s["x1"] for s in samples]),  # (B, 4, h, w)
    }
    if all("text_states" in s for s in samples):
        batch["text_states"] = torch.stack([s["text_states"] for s in samples])
    if samples and STATE_KEY in samples[-1]:
        batch[STATE_KEY] = samples[-1][STATE_KEY]  # the worker's stream position after this batch
    return batch


class CouplingDataModule(ResumableTrainStream, L.LightningDataModule):
    """Training (resampled) and validation (finite) loaders over coupling shards.

    Args:
        train, val: shard specs; a folder is read as all of its ``*.tar`` (the writer's output).
        missing_shards: "skip" (count a shard file that vanished, as ``missing_shard``) or "error".

    The training stream's position is saved in checkpoints and restored (``data.stream_state``): a resumed
    run trains on the batches the interrupted one would have.
    """

    def __init__(self, train: str, val: str | None = None, batch_size: int = 64, eval_batch_size: int | None = None,
                 num_workers: int = 1, shuffle_buffer: int = 2000, seed: int = 0,
                 missing_shards: str = "skip") -> None:
        super().__init__()
        self.missing_shards = check_missing_shards(missing_shards)
        self.specs = {"train": train, "val": val}
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed

    @staticmethod
    def resolve(spec: str) -> list[str]:
        p = Path(spec)
        if p.is_dir():
            shards = sorted(str(s) for s in p.glob("*.tar"))
            if not shards:
                raise FileNotFoundError(f"no coupling shards (*.tar) in {spec}: run the coupling stage first (make gen-pairs)")
            return shards
        return [spec]

    def _loader(self, stage: str, batch_size: int) -> DataLoader:
        spec = self.specs[stage]
        if spec is None:
            raise ValueError(f"no coupling shards configured for '{stage}': set data.init_args.{stage}")
        train = stage == "train"
        shards = self.resolve(spec)
        kw = {}
        if train:  # continued exactly where the checkpoint left it, else fresh (data.stream_state)
            resume, offset, epoch = self.train_resume(
                self.num_workers, shards, self.trainer.global_step if self.trainer is not None else 0)
            kw = dict(state_every=batch_size, resume=resume, worker_offset=offset, epoch=epoch)
        stream = CouplingStream(shards, resampled=train, shuffle_buffer=self.shuffle_buffer if train else 0,
                                seed=self.seed, missing_shards=self.missing_shards, **kw)
        return DataLoader(stream, batch_size=batch_size, num_workers=self.num_workers, collate_fn=collate_pairs,
                          worker_init_fn=ignore_sigterm if self.num_workers else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size)
