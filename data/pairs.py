"""Read coupling shards written by ``callbacks.pair_writer.CouplingWriter``: (x0, x1, caption).

x0 is regenerated from the stored seed (the same CPU-generator rule the writer used) unless the
shard stores it. The reading machinery (resampling, splitting, counted skips) is the LAION
reader's; only the decoding differs (a training stream whose shards hold no usable coupling raises
``EmptyStreamError`` like the LAION reader's). Members are read without unpickling: ``.npy`` with
``allow_pickle=False``, ``.json`` through ``data.meta.parse_meta`` (bounded in size and depth).
"""

from __future__ import annotations

import io
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from data.laion import LaionStream
from data.meta import parse_meta
from instaflow.flow.noise import seeded_noise


def _npy(data: bytes) -> torch.Tensor:
    """A ``.npy`` member as float32; a pickled (object) array is refused, never unpickled."""
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32))


class CouplingStream(LaionStream):
    """Samples ``{key, caption, x0, x1, seed, skipped}`` (latents float32, (4, h, w))."""

    def _decode(self, raw: dict) -> dict | None:
        key = raw.get("__key__")
        if "x1.npy" not in raw:
            return self._skip("missing_x1", key)
        try:
            caption = raw["txt"].decode("utf-8").strip() if "txt" in raw else None
        except UnicodeDecodeError:
            return self._skip("bad_caption_encoding", key)
        if caption is None:
            return self._skip("missing_caption", key)  # "" is valid here: an unconditional coupling
        meta, why = parse_meta(raw["json"]) if "json" in raw else ({}, "")
        if why:
            return self._skip("bad_coupling", f"{key}: .json {why}")
        try:
            x1 = _npy(raw["x1.npy"])
            x0 = _npy(raw["x0.npy"]) if "x0.npy" in raw else seeded_noise([meta["seed"]], tuple(x1.shape))[0]
            states = _npy(raw["states.npy"]) if "states.npy" in raw else None
        except Exception as exn:  # corrupt or pickled npy, or no seed and no x0
            return self._skip("bad_coupling", f"{key}: {exn!r}"[:300])
        if not (torch.isfinite(x1).all() and torch.isfinite(x0).all()):
            return self._skip("non_finite_latent", key)
        sample = {"key": key, "caption": caption, "x0": x0, "x1": x1, "seed": meta.get("seed", -1),
                  "url": raw.get("__url__"), "worker": self._worker, "meta": None}
        if states is not None:
            sample["text_states"] = states
        return sample


def collate_pairs(samples: list[dict]) -> dict:
    batch = {
        "key": [s["key"] for s in samples], "caption": [s["caption"] for s in samples],
        "seed": [s["seed"] for s in samples], "skipped": sum(s["skipped"] for s in samples),
        "x0": torch.stack([s["x0"] for s in samples]),  # (B, 4, h, w)
        "x1": torch.stack([s["x1"] for s in samples]),  # (B, 4, h, w)
    }
    if all("text_states" in s for s in samples):
        batch["text_states"] = torch.stack([s["text_states"] for s in samples])
    return batch


class CouplingDataModule(L.LightningDataModule):
    """Training (resampled) and validation (finite) loaders over coupling shards.

    Args:
        train, val: shard specs; a folder is read as all of its ``*.tar`` (the writer's output).
    """

    def __init__(self, train: str, val: str | None = None, batch_size: int = 64, eval_batch_size: int | None = None,
                 num_workers: int = 1, shuffle_buffer: int = 2000, seed: int = 0) -> None:
        super().__init__()
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
        stream = CouplingStream(self.resolve(spec), resampled=train, shuffle_buffer=self.shuffle_buffer if train else 0,
                                seed=self.seed, epoch=self.trainer.global_step if self.trainer is not None else 0)
        return DataLoader(stream, batch_size=batch_size, num_workers=self.num_workers, collate_fn=collate_pairs)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size)
