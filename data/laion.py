"""LAION text-image streams from img2dataset-layout WebDataset shards.

One reader serves real LAION (local paths, brace patterns such as ``{00000..01210}.tar``, or
``pipe:`` commands) and the embedded shapes world, which is written in the same layout.

Two ways of reading, chosen on purpose (docs/pitfalls.md):
- training streams *resample* shards forever, seeded by (seed, rank, worker), so every rank always
  has a batch and no collective waits on an exhausted rank; train by ``max_steps``; a resumed run
  continues each stream exactly where its checkpoint left it (``data.stream_state``);
- finite passes (evaluation, teacher ODE solving) split the shard list explicitly by rank, then by
  worker, so every sample is read exactly once.

Bad input never crashes the stream and is never lost silently: a corrupt image, a missing or
non-UTF-8 caption, an unreadable or truncated tar is skipped and counted. Each sample carries
how many were skipped before it in its worker (the last one also those after it), so the
``skipped`` of all batches sums to the exact count. A tar that breaks off counts once as
``unreadable_tar``; the samples read before the break are kept, and a sample cut short by it is
decoded with the members it has (no ``.txt``: skipped as ``missing_caption``). A worker whose
shards yield no sample at all (every sample bad) has nothing to carry its count: with
``report_empty`` (the datamodule's predict loader, whose stage reports totals) it yields one
*carrier* ``{"carrier": True, "skipped": n, ...}`` instead, which ``collate`` drops from the batch
while adding its count (a batch of only a carrier has no samples and ``skipped`` = n).

Caption filters (``CaptionFilters``: caption length, LAION's ``punsafe``, ``pwatermark`` and
``similarity`` from each sample's ``.json``) drop samples the same way, each under its own reason
(``filtered_<what>``, never a corrupt-data reason): ``skipped`` counts every dropped sample,
``filtered`` the part of it that the filters dropped.

Shard bytes are untrusted: images are decoded as JPEG, PNG or WebP only (``data.images``), a
``.json`` too large, too deep or not an object is bad metadata (``data.meta``), and a resampled
stream whose shards hold no usable sample raises ``EmptyStreamError`` instead of spinning forever
(``data.stream_guard``).
"""

from __future__ import annotations

import logging
import random
import signal
from collections import Counter
from typing import Any, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander
from webdataset.utils import pytorch_worker_info

from data.images import IMAGE_KEYS, load_image
from data.meta import CaptionFilters, parse_meta
from data.stream_guard import DryGuard, EmptyStreamError
from data.stream_state import STATE_KEY, ResampledReading, ResumableTrainStream

__all__ = ["CaptionFilters", "EmptyStreamError", "IMAGE_KEYS", "LaionDataModule", "LaionStream", "collate",
           "expand_shards", "load_image"]

log = logging.getLogger(__name__)


def expand_shards(spec: str | list[str]) -> list[str]:
    """Expand ``a/{00000..00009}.tar::b/x.tar`` (or a list of such) into a list of URLs."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls = []
    for s in specs:
        urls.extend(expand_urls(s))
    return urls


MISSING_SHARDS = ("skip", "error")


def check_missing_shards(value: str) -> str:
    """``value`` if it is a ``missing_shards`` setting, else a ValueError naming the choices."""
    if value not in MISSING_SHARDS:
        raise ValueError(f"missing_shards must be one of {MISSING_SHARDS}, got {value!r}")
    return value


class LaionStream(ResampledReading, IterableDataset):
    """Samples ``{key, caption, meta, pixel_values?, skipped, filtered}`` from img2dataset shards.

    Resampled streams can be continued exactly (``data.stream_state``): ``state_every`` (the batch size)
    attaches the worker's position to the last sample of each batch, ``resume`` (positions by virtual worker)
    and ``worker_offset`` continue them. ``missing_shards``: a shard file that does not exist (deleted from
    shared storage mid-run) is counted and skipped (``missing_shard``), or raises ``FileNotFoundError``.
    """

    def __init__(
        self,
        shards: str | list[str],
        resolution: int = 512,
        resampled: bool = False,
        shuffle_buffer: int = 0,
        captions_only: bool = False,
        require_meta: bool = False,
        seed: int = 0,
        epoch: int = 0,
        exclude: set[str] | frozenset[str] = frozenset(),
        filters: CaptionFilters | dict | None = None,
        split_by_rank: bool = True,
        report_empty: bool = False,
        state_every: int = 0,
        resume: dict | None = None,
        worker_offset: int = 0,
        missing_shards: str = "skip",
    ) -> None:
        super().__init__()
        self.missing_shards = check_missing_shards(missing_shards)
        self.state_every, self.resume, self.worker_offset = state_every, resume, worker_offset
        self.report_empty = report_empty
        self.exclude = set(exclude)
        self.filters = CaptionFilters(**filters) if isinstance(filters, dict) else filters
        self.spec = shards
        self.urls = expand_shards(shards)
        if not self.urls:
            raise ValueError(f"no shards match {shards!r}")
        self.resolution = resolution
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.captions_only = captions_only
        self.require_meta = require_meta
        self.seed = seed
        self.epoch = epoch
        self.skips: Counter = Counter()  # per process; in workers, reported through `skipped`
        self._pending = 0
        self._pending_filtered = 0
        self._shard_failed = False
        self.meta_dropped = 0  # samples kept without their unreadable ``.json`` (require_meta skips them instead)
        self._guard = DryGuard(self.spec, self.urls)  # renewed by each iteration
        self.split_by_rank = split_by_rank  # False: every rank reads every shard (a fixed evaluation set)

    # -- shard selection -------------------------------------------------------------------
    def _shard_urls(self) -> Iterator[str]:
        """This worker's part of the shard list, for a finite pass (the resampled path: ``ResampledReading``)."""
        rank, world, worker, n_workers = pytorch_worker_info()
        if not self.split_by_rank:
            rank, world = 0, 1
        if len(self.urls) < world * n_workers:
            raise ValueError(
                f"{len(self.urls)} shards cannot be split over {world} ranks x {n_workers} workers: "
                "some would read nothing. Use fewer workers or more (smaller) shards."
            )
        mine = self.urls[rank::world][worker::n_workers]
        # shards finished by an earlier run are skipped after the split, so the split stays the same
        yield from (u for u in mine if u not in self.exclude)

    # -- decoding --------------------------------------------------------------------------
    def _skip(self, reason: str, detail: Any = "") -> None:
        self.skips[reason] += 1
        self._pending += 1
        self._guard.skipped(reason)
        _say("skipped a sample", reason, self.skips[reason], detail)

    def _handler(self, exn: Exception) -> bool:
        if not self._shard_failed:  # a cut tar raises twice (member data, then next header): count once
            self._shard_failed = True
            self._skip("unreadable_tar", repr(exn)[:300])
        return True  # go on with the next shard; samples read before the error are kept

    def _decode(self, raw: dict) -> dict | None:
        key = raw.get("__key__")
        txt = raw.get("txt")
        if txt is None:
            return self._skip("missing_caption", key)
        try:
            caption = txt.decode("utf-8").strip()
        except UnicodeDecodeError:
            return self._skip("bad_caption_encoding", key)
        if not caption:
            return self._skip("missing_caption", key)
        meta, why = parse_meta(raw["json"]) if "json" in raw else (None, "")
        if why and self.require_meta:
            return self._skip("bad_meta", f"{key}: {why}")
        if why:
            self.meta_dropped += 1
            _say("kept a sample without its metadata", "bad_meta", self.meta_dropped, f"{key}: {why}")
        if meta is None and self.require_meta:
            return self._skip("missing_meta", key)
        if self.filters is not None:
            reason = self.filters.reason(caption, meta)
            if reason is not None:
                self._pending_filtered += 1
                return self._skip(reason, key)
        # url + worker let a writer know when an input shard is complete (coupling generation)
        sample = {"key": key, "caption": caption, "meta": meta, "url": raw.get("__url__"), "worker": self._worker}
        if not self.captions_only:
            data = next((raw[k] for k in IMAGE_KEYS if k in raw), None)
            if data is None:
                return self._skip("missing_image", key)
            try:
                sample["pixel_values"] = load_image(data, self.resolution)
            except Exception as exn:  # PIL raises many types for corrupt files
                return self._skip("bad_image", f"{key}: {exn!r}"[:300])
        return sample

    def __iter__(self) -> Iterator[dict]:
        self._pending = self._pending_filtered = 0
        rank, world, worker, n_workers = pytorch_worker_info()
        self._worker = worker
        self._guard = DryGuard(self.spec, self.urls)
        self._select = (lambda f: not f.lower().endswith(tuple("." + k for k in IMAGE_KEYS))) if self.captions_only \
            else None
        if self.resampled:
            if not self.split_by_rank:
                rank = 0
            # a restarted DataLoader starts at worker 0: each worker continues the virtual worker whose turn it is
            self._worker = (worker + self.worker_offset) % n_workers
            yield from self._resampled(rank, self._worker)
            return
        files = self._expand(self._open(self._shard_urls()), self._select)
        samples = self._usable(group_by_keys(files, handler=self._handler))
        if self.shuffle_buffer > 1:
            samples = self._shuffle(samples)
        prev = None  # one sample of lookahead, so skips after the last sample are reported too
        for s in samples:
            s["skipped"], self._pending = self._pending, 0
            s["filtered"], self._pending_filtered = self._pending_filtered, 0
            if prev is not None:
                yield prev
            prev = s
        if prev is not None:
            prev["skipped"], self._pending = prev["skipped"] + self._pending, 0
            prev["filtered"], self._pending_filtered = prev["filtered"] + self._pending_filtered, 0
            yield prev
        elif self._pending and self.report_empty:
            yield {"carrier": True, "key": None, "skipped": self._pending, "filtered": self._pending_filtered,
                   "url": None, "worker": self._worker}
            self._pending = self._pending_filtered = 0
        elif self._pending:
            log.warning("%d samples skipped and no sample left to report them on (report_empty=True counts them)",
                        self._pending)

    def _usable(self, raws: Iterator[dict]) -> Iterator[dict]:
        """The decoded samples that are usable; a resampled stream that can never yield one raises (``DryGuard``)."""
        for raw in raws:
            sample = self._decode(raw)
            if sample is not None:
                self._guard.usable()
                yield sample
            elif self.resampled:
                self._guard.check()

    def _expand(self, sources: Iterator[dict], select) -> Iterator[dict]:
        """Members of each shard, then an end-of-shard marker, also after a read error (webdataset
        omits it then, and would merge a cut sample into the next shard's first one)."""
        for source in sources:
            self._shard_failed = False
            self._guard.shard_start()
            yield from tar_file_expander([source], handler=self._handler, select_files=select, eof_value=None)
            yield {}
            # resumed only after the shard's last sample was decoded: the guard knows whether it gave one
            self._shard_read(source["url"])

    def _shard_read(self, url: str) -> None:
        self._guard.shard_end(url)
        if self.resampled:
            self._guard.check()

    def _open(self, urls: Iterator[str]) -> Iterator[dict]:
        for url in urls:
            stream = self._gopen(url)
            if stream is None:
                self._guard.shard_start()
                self._shard_read(url)
                continue
            yield {"url": url, "stream": stream}

    def _gopen(self, url: str):
        """The opened shard, or None when it cannot be opened (counted; a missing file raises under ``error``)."""
        try:
            return gopen(url)
        except FileNotFoundError as exn:
            if self.missing_shards == "error":
                raise FileNotFoundError(f"shard {url} does not exist (deleted or moved from shared storage?); "
                                        "restore it, or set data.init_args.missing_shards: skip to count and skip "
                                        "missing shards") from exn
            self._skip("missing_shard", f"{url}: {exn!r}")
        except Exception as exn:
            self._skip("unreadable_shard", f"{url}: {exn!r}")
        return None

    def _shard_raws(self, url: str) -> Iterator[dict]:
        """The grouped samples (raw members) of one shard, read errors counted once (the resampled path)."""
        stream = self._gopen(url)
        if stream is None:
            return
        self._shard_failed = False
        try:
            files = tar_file_expander([{"url": url, "stream": stream}], handler=self._handler,
                                      select_files=self._select, eof_value=None)
            yield from group_by_keys(files, handler=self._handler)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()

    def _shuffle(self, samples: Iterator[dict]) -> Iterator[dict]:
        rank, _, worker, _ = pytorch_worker_info()
        rng = random.Random(f"{self.seed}-{rank}-{worker}-{self.epoch}-shuffle")
        buf: list[dict] = []
        for s in samples:
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                continue
            i = rng.randrange(len(buf))
            buf[i], s = s, buf[i]
            yield s
        rng.shuffle(buf)
        yield from buf


def _say(what: str, reason: str, n: int, detail: Any) -> None:
    """Log the first few of a kind, then at powers of two; a filter doing its job at INFO, bad data at WARNING."""
    if n <= 5 or n & (n - 1) == 0:
        level = logging.INFO if reason.startswith("filtered_") else logging.WARNING
        log.log(level, "%s (%s, %d so far): %s", what, reason, n, detail)


SIGTERM_GRACE_S = 20  # how long a DataLoader worker outlives a SIGTERM


def _end_after_grace(signum, frame) -> None:
    signal.alarm(SIGTERM_GRACE_S)  # SIGALRM's default action ends the process


def ignore_sigterm(worker_id: int) -> None:
    """A DataLoader worker outlives SIGTERM by ``SIGTERM_GRACE_S`` seconds, then ends.

    torchrun and SLURM signal whole process groups or job steps: a worker that died of it at once surfaced
    in its rank as a RuntimeError at any point of a step, on some ranks and not others, and broke the
    step-boundary checkpoint every rank must take part in. Ignoring SIGTERM outright is no better: a worker
    its DataLoader cannot join is ended with SIGTERM, and at exit Python waits for it forever (a rank that
    raised then never exits). With the grace, the ranks save at their next step boundary while their workers
    still run, and a stuck worker still ends.
    """
    signal.signal(signal.SIGTERM, _end_after_grace)


def collate(samples: list[dict]) -> dict:
    """Stack tensors, keep strings and metadata as lists, sum the skip counts (carriers' included, their
    entries dropped: a batch of only a carrier has empty lists and no tensors)."""
    real = [s for s in samples if not s.get("carrier")]
    batch: dict[str, Any] = {
        "key": [s["key"] for s in real],
        "caption": [s["caption"] for s in real],
        "meta": [s["meta"] for s in real],
        "skipped": sum(s["skipped"] for s in samples),  # filtered samples included
        "filtered": sum(s.get("filtered", 0) for s in samples),
        "url": [s.get("url") for s in real],
        "worker": [s.get("worker", 0) for s in real],
    }
    if real and "pixel_values" in real[0]:
        batch["pixel_values"] = torch.stack([s["pixel_values"] for s in real])  # (B, 3, H, W)
    if samples and STATE_KEY in samples[-1]:
        batch[STATE_KEY] = samples[-1][STATE_KEY]  # the worker's stream position after this batch
    return batch


class LaionDataModule(ResumableTrainStream, L.LightningDataModule):
    """Train/val/test/predict loaders over img2dataset-layout shards (see module docstring).

    Args:
        train, val, test, predict: shard specs (path, brace pattern, ``pipe:`` command, or
            several joined by ``::``); unset stages have no loader.
        resolution: images are resized (shorter side) and centre-cropped to this size.
        captions_only: never read or decode images (teacher ODE solving needs prompts only).
        require_meta: skip samples without a readable ``.json`` (the embedded world's ground truth).
        filters: caption / metadata filters (``CaptionFilters``) for every stage; None keeps all.
        missing_shards: "skip" (count a shard file that does not exist, as ``missing_shard``) or "error".

    The training stream's position is saved in checkpoints and restored (``data.stream_state``).
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        predict: str | None = None,
        resolution: int = 512,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        captions_only: bool = False,
        require_meta: bool = False,
        filters: CaptionFilters | None = None,
        seed: int = 0,
        missing_shards: str = "skip",
    ) -> None:
        super().__init__()
        self.missing_shards = check_missing_shards(missing_shards)
        self.filters = filters
        self.shards = {"train": train, "val": val, "test": test, "predict": predict}
        self.resolution = resolution
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.captions_only = captions_only
        self.require_meta = require_meta
        self.seed = seed
        # input shards already done, per stage (set by e.g. the coupling writer on a rerun)
        self.exclude_shards: dict[str, set[str]] = {}

    def stream(self, stage: str, **overrides) -> LaionStream:
        spec = self.shards[stage]
        if spec is None:
            raise ValueError(f"no shards configured for '{stage}': set data.init_args.{stage}")
        train = stage == "train"
        kw = dict(
            resolution=self.resolution, resampled=train, shuffle_buffer=self.shuffle_buffer if train else 0,
            captions_only=self.captions_only, require_meta=self.require_meta, filters=self.filters, seed=self.seed,
            # predict (coupling generation) reports the stage's skip totals: a worker left without samples reports too
            report_empty=stage == "predict", missing_shards=self.missing_shards,
        )
        if train:  # continued exactly where the checkpoint left it, else fresh (data.stream_state)
            resume, offset, epoch = self.train_resume(self.num_workers, expand_shards(spec), self._step())
            kw.update(state_every=self.batch_size, resume=resume, worker_offset=offset, epoch=epoch)
        kw.update(overrides)
        return LaionStream(spec, exclude=self.exclude_shards.get(stage, set()), **kw)

    def _step(self) -> int:
        return self.trainer.global_step if self.trainer is not None else 0

    def _loader(self, stage: str, batch_size: int) -> DataLoader:
        return DataLoader(
            self.stream(stage), batch_size=batch_size, num_workers=self.num_workers, collate_fn=collate,
            persistent_workers=False, pin_memory=torch.cuda.is_available(),
            worker_init_fn=ignore_sigterm if self.num_workers else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", self.eval_batch_size)
