"""Write couplings (seed or x0, x1 latent, caption) as WebDataset shards, resumably.

Output shard k holds exactly the samples of input shard k (same file name), written by the rank
that read it, to a temporary name and renamed when complete (``instaflow.state``: same folder, fsync,
``os.replace``), with ``{name}_stats.json`` last, written the same way. A
rerun excludes the input shards whose outputs are complete, so a killed job loses and duplicates
nothing: a half-written shard is simply regenerated. Each shard's stats file lists its keys and the
rank that wrote it, and each rank writes ``manifest_rank{r}.json`` (the shards and keys it wrote in
this run) when it finishes.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections import defaultdict
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from data.laion import expand_shards
from data.shards import npy_bytes, write_tar
from instaflow.contracts import DescribesCouplings
from instaflow.evaluation.grids import captioned_grid, save_png
from instaflow.state import atomic_write_json, read_json, remove_stale_temporaries


def shard_name(url: str) -> str:
    """Output file name of an input shard URL (``pipe:`` commands use their last token)."""
    return os.path.basename(url.split()[-1]) if url.startswith("pipe:") else os.path.basename(url)


class CouplingWriter(BasePredictionWriter):
    """Buffers predictions per input shard and writes a shard when its reader has moved on.

    Each DataLoader worker reads its shards one after another, so when a worker's samples switch to
    a new shard, its previous shard is complete; everything left is written at the end.
    """

    def __init__(self, output_dir: str, latent_dtype: str = "float16", grid_size: int = 16) -> None:
        """``grid_size``: decode this many x1 of the first batch into an image grid for the logger
        (TensorBoard ``couplings/x1``, captions in ``couplings/captions``); 0 turns it off."""
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.latent_dtype = latent_dtype
        self.grid_size = grid_size
        self._buffers: dict[str, list[dict]] = defaultdict(list)
        self._current: dict[int, str] = {}
        self._names: dict[str, str] = {}
        self._written: dict[str, list[str]] = {}  # this run's shards -> keys, for the rank's manifest
        self._rank, self._world = 0, 1

    # -- resume ----------------------------------------------------------------------------
    def is_done(self, url: str) -> bool:
        """Complete: its shard and a readable stats mark exist (a mark cut by a kill, or a lost shard, means redo)."""
        name = self.name_of(url)
        stats = read_json(self.output_dir / f"{Path(name).stem}_stats.json")
        return isinstance(stats, dict) and "count" in stats and (self.output_dir / name).is_file()

    def name_of(self, url: str) -> str:
        return self._names.get(url) or shard_name(url)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        dm = trainer.datamodule
        urls = expand_shards(dm.shards["predict"])
        names = [shard_name(u) for u in urls]
        if len(set(names)) < len(names):  # same file names in several folders: disambiguate
            names = [f"{zlib.crc32(u.encode()):08x}_{n}" for u, n in zip(urls, names)]
        self._names = dict(zip(urls, names))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.output_dir)  # half-written shards of killed writers on this machine
        done = {u for u in urls if self.is_done(u)}
        dm.exclude_shards["predict"] = done
        self._rank, self._world = trainer.global_rank, trainer.world_size
        self._written = {}
        self._total = len(urls)
        self._skipped_done = len(done)
        if trainer.is_global_zero:
            print(f"couplings -> {self.output_dir}: {len(done)}/{len(urls)} shards already complete, skipped")

    def on_predict_start(self, trainer, pl_module) -> None:
        from tqdm.auto import tqdm

        if trainer.is_global_zero:  # the model is configured by now
            meta = pl_module.metadata() if isinstance(pl_module, DescribesCouplings) else {}
            atomic_write_json(self.output_dir / "generation.json", meta)

        self._t0, self._n, self._skips, self._grid_logged = time.time(), 0, 0, False
        self._bar = tqdm(desc=f"couplings (rank {trainer.global_rank})", unit="pair",
                         disable=not trainer.is_global_zero, mininterval=2)

    # -- writing ---------------------------------------------------------------------------
    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        n = len(prediction["key"])
        for i in range(n):
            url, worker = prediction["url"][i], prediction["worker"][i]
            prev = self._current.get(worker)
            if prev is not None and prev != url:
                self._flush(prev)
            self._current[worker] = url
            self._buffers[url].append({k: (v[i] if isinstance(v, (list, torch.Tensor)) else v)
                                       for k, v in prediction.items() if k not in ("skipped",)})
        self._n += n
        self._skips += int(prediction.get("skipped", 0))
        rate = self._n / max(time.time() - self._t0, 1e-9)
        self._bar.update(n)
        self._bar.set_postfix(pairs_per_s=f"{rate:.1f}", skipped=self._skips)
        if trainer.is_global_zero:
            self._log(trainer, pl_module, prediction, rate)

    def _log(self, trainer, pl_module, prediction: dict, rate: float) -> None:
        """Rank 0's progress as TensorBoard curves (x = couplings written), and the first batch as a grid."""
        metrics = {"couplings/written": float(self._n), "couplings/per_second": rate,
                   "couplings/skipped_inputs": float(self._skips)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=self._n)
        if (self._grid_logged or not self.grid_size or not prediction["key"]
                or not isinstance(pl_module, DescribesCouplings)):
            return
        k = min(self.grid_size, len(prediction["key"]))
        grid = captioned_grid(pl_module.decode(prediction["x1"][:k]), list(prediction["caption"][:k]), nrow=8,
                              scale=4)  # (3, H', W'), each x1 above its caption
        captions = "  \n".join(f"{i}: {c}" for i, c in enumerate(prediction["caption"][:k]))
        for logger in trainer.loggers:
            exp = getattr(logger, "experiment", None)
            if hasattr(exp, "add_image"):
                exp.add_image("couplings/x1", grid, 0)
                exp.add_text("couplings/captions", captions, 0)
        log_dir = getattr(trainer.loggers[0], "log_dir", None) if trainer.loggers else None  # no broadcast: rank 0 only
        if log_dir:
            save_png(grid, Path(log_dir) / "grids" / "couplings_x1.png")
        self._grid_logged = True

    def _flush(self, url: str) -> None:
        samples = self._buffers.pop(url, [])
        if not samples:
            return
        name = self.name_of(url)
        members = []
        for s in sorted(samples, key=lambda s: s["key"]):
            key = s["key"]
            members.append((f"{key}.txt", s["caption"].encode("utf-8")))
            members.append((f"{key}.json", json.dumps({"key": key, "seed": int(s["seed"]), "caption": s["caption"],
                                                       "source": url}).encode()))
            members.append((f"{key}.x1.npy", npy_bytes(s["x1"], self.latent_dtype)))
            if "x0" in s:
                members.append((f"{key}.x0.npy", npy_bytes(s["x0"], "float32")))
            if "text_states" in s:
                members.append((f"{key}.states.npy", npy_bytes(s["text_states"], "float16")))
        path = self.output_dir / name
        write_tar(path, members)
        keys = sorted(s["key"] for s in samples)
        stats = {"count": len(samples), "source": url, "written_at": time.time(), "rank": self._rank,
                 "world_size": self._world, "keys": keys}
        atomic_write_json(self.output_dir / f"{Path(name).stem}_stats.json", stats, indent=None)  # marks it complete
        self._written[name] = keys

    def on_predict_end(self, trainer, pl_module) -> None:
        for url in list(self._buffers):
            self._flush(url)
        self._current.clear()
        self._bar.close()
        manifest = {"rank": self._rank, "world_size": self._world, "shards": self._written,
                    "count": sum(len(k) for k in self._written.values()), "skipped_complete": self._skipped_done}
        atomic_write_json(self.output_dir / f"manifest_rank{self._rank}.json", manifest, indent=1)
        for logger in trainer.loggers:
            logger.save()
        if trainer.is_global_zero:
            wall = time.time() - self._t0
            print(f"wrote {self._n} couplings in {wall:.1f}s ({self._n / max(wall, 1e-9):.1f}/s) on rank 0; "
                  f"{self._skips} input samples skipped")
