"""Write couplings (seed or x0, x1 latent, caption) as WebDataset shards, resumably.

The format (members, completion mark, generation record, manifests) is ``data.couplings``'s; this
callback decides when and where. Output shard k holds exactly the samples of input shard k (same
file name), written by the rank that read it, to a temporary name and renamed when complete
(``instaflow.state``: same folder, fsync, ``os.replace``), with its completion mark
``{name}_stats.json`` last, written the same way. A rerun excludes the input shards whose outputs
are complete, so a killed job loses and duplicates nothing: a half-written shard is simply
regenerated. Each shard's mark lists its keys and the rank that wrote it, and each rank writes
``manifest_rank{r}.json`` (the shards and keys it wrote in this run) when it finishes.
"""

from __future__ import annotations

import os
import time
import zlib
from collections import defaultdict
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from data.couplings import (check_latent_dtype, coupling_stats, is_complete, write_coupling_shard,
                            write_generation_record, write_manifest, write_mark)
from data.laion import expand_shards
from instaflow.contracts import DescribesCouplings
from instaflow.evaluation.grids import captioned_grid, save_png
from instaflow.state import remove_stale_temporaries


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
        self.latent_dtype = check_latent_dtype(latent_dtype)
        self.grid_size = grid_size
        self._buffers: dict[str, list[dict]] = defaultdict(list)
        self._current: dict[int, str] = {}
        self._names: dict[str, str] = {}
        self._written: dict[str, list[str]] = {}  # this run's shards -> keys, for the rank's manifest
        self._rank, self._world = 0, 1

    # -- resume ----------------------------------------------------------------------------
    def is_done(self, url: str) -> bool:
        """Complete: its shard and a readable stats mark exist (a mark cut by a kill, or a lost shard, means redo)."""
        return is_complete(self.output_dir / self.name_of(url))

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
            write_generation_record(self.output_dir, meta)

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
        keys = write_coupling_shard(self.output_dir / name, samples, url, self.latent_dtype)
        stats = coupling_stats(keys, url, time.time(), self._rank, self._world)
        write_mark(self.output_dir / name, stats)  # last: it marks the shard complete
        self._written[name] = keys

    def on_predict_end(self, trainer, pl_module) -> None:
        for url in list(self._buffers):
            self._flush(url)
        self._current.clear()
        self._bar.close()
        write_manifest(self.output_dir, self._rank, self._world, self._written, self._skipped_done)
        for logger in trainer.loggers:
            logger.save()
        if trainer.is_global_zero:
            wall = time.time() - self._t0
            print(f"wrote {self._n} couplings in {wall:.1f}s ({self._n / max(wall, 1e-9):.1f}/s) on rank 0; "
                  f"{self._skips} input samples skipped")
