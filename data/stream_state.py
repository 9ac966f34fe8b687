"""Exact resume of a resampled training stream: where each worker stands, saved in the checkpoint, restored.

A resampled stream (``data.laion.LaionStream(resampled=True)``) is a pure function of its seeds until it
is interrupted. What a restart must restore, per rank and per DataLoader worker, is its *position*:

- the shard chooser's RNG, the shard it is reading and how many samples of that shard it has read
  (usable or not): reopened, the shard is read up to there without decoding;
- the shuffle buffer, as references (shard, sample number) re-read and decoded on restore (references,
  not bytes: a 2,000-sample buffer of LAION images would be hundreds of MB per worker), and the shuffle's
  RNG;
- how many batches the rank consumed: a new DataLoader starts at worker 0, while the interrupted one
  would have asked worker ``batches % workers`` next, so each worker takes over a *virtual* worker id
  (``(worker + batches) % workers``) whose seeds and position it continues.

The stream attaches its position to the last sample of each batch (``state_every`` = the batch size), the
collate function moves it into the batch (``batch["stream_state"]``), and the datamodule
(``ResumableTrainStream``) records it when the training loop takes that batch, so a position is never
ahead of the batches trained on (DataLoader workers prefetch). Checkpoints hold every rank's positions
(one all-gather of small objects when a checkpoint is written, on every rank as Lightning requires).

What is not exact: a restart on another number of ranks or workers, or over another shard list, cannot
continue the same streams; it warns and falls back to fresh streams seeded with the restart step (the
pre-exact behaviour). A shard that vanished loses the buffered samples it held, counted as skipped.
"""

from __future__ import annotations

import logging
import random
import zlib
from typing import Any

import torch.distributed as dist

log = logging.getLogger(__name__)

VERSION = 1
STATE_KEY = "stream_state"  # the batch key and the sample key that carry a position


def rng_state(rng: random.Random) -> list:
    """``random.Random``'s state as plain lists and ints (checkpoints are loaded weights-only)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_rng_state(rng: random.Random, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


def fingerprint(urls: list[str]) -> str:
    """The shard list a position refers to by index: a restart over another list cannot use it."""
    return f"{len(urls)}-{zlib.crc32(chr(10).join(urls).encode()):08x}"


def worker_offset(batches: int, n_workers: int) -> int:
    """Which virtual worker a new DataLoader's worker 0 continues (see the module docstring)."""
    return batches % max(n_workers, 1)


class ResumableTrainStream:
    """Mixin for a ``LightningDataModule`` whose training stream is resampled: its position in checkpoints.

    The datamodule calls ``train_resume(n_workers, urls)`` when it builds the training stream; it gets
    ``(positions by virtual worker or None, worker offset, epoch)``.
    """

    _positions: dict[int, dict]
    _batches: int = 0
    _epoch: int | None = None
    _restored: dict | None = None

    def _stream_state(self) -> dict:
        if not hasattr(self, "_positions"):
            self._positions = {}
        return self._positions

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # called in the main process when the loop takes a batch (not when a worker prefetched it)
        if isinstance(batch, dict) and STATE_KEY in batch:
            state = batch.pop(STATE_KEY)
            if state is not None and self.trainer is not None and self.trainer.training:
                self._stream_state()[int(state["worker"])] = state
                self._batches += 1
        return batch

    def train_resume(self, n_workers: int, urls: list[str], step: int) -> tuple[dict | None, int, int]:
        """(positions by virtual worker, worker offset, epoch) for a training stream built at ``step``."""
        restored, self._restored = self._restored, None
        if restored is not None:
            why = None
            if restored.get("n_workers") != max(n_workers, 1):
                why = f"{restored.get('n_workers')} DataLoader workers per rank then, {max(n_workers, 1)} now"
            elif restored.get("shards") != fingerprint(urls):
                why = "another shard list"
            if why is None:
                self._positions = {int(k): v for k, v in restored["positions"].items()}
                self._batches = int(restored["batches"])
                self._epoch = int(restored["epoch"])
                return dict(self._positions), worker_offset(self._batches, n_workers), self._epoch
            log.warning("the training stream cannot continue where the checkpoint left it (%s): it restarts with "
                        "fresh streams seeded with step %d (the run is resumed, not replayed exactly)", why, step)
        self._positions, self._batches, self._epoch = {}, 0, step
        self._shards = fingerprint(urls)
        self._n_workers = max(n_workers, 1)
        return None, 0, step

    def _rank_state(self) -> dict:
        return {"version": VERSION, "positions": dict(self._stream_state()), "batches": self._batches,
                "epoch": self._epoch if self._epoch is not None else 0,
                "n_workers": getattr(self, "_n_workers", None), "shards": getattr(self, "_shards", None)}

    def state_dict(self) -> dict:
        """Every rank's stream position (a collective: Lightning builds checkpoints on every rank)."""
        if getattr(self, "_n_workers", None) is None:
            return {}  # no training stream was built (predict, validate)
        mine = self._rank_state()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks: list = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)  # our own ranks' plain dicts, never a file's bytes
        else:
            ranks = [mine]
        return {"stream": {"version": VERSION, "ranks": ranks}}

    def load_state_dict(self, state: dict) -> None:
        stream = state.get("stream") if isinstance(state, dict) else None
        if not stream:
            return
        ranks = stream.get("ranks") or []
        rank = self.trainer.global_rank if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        if stream.get("version") != VERSION or len(ranks) != world:
            log.warning("the checkpoint's training streams were saved by %d ranks, this run has %d: the streams "
                        "restart fresh (seeded with the restart step), not exactly where they stopped",
                        len(ranks), world)
            return
        restored = ranks[rank]
        # the fingerprint and worker count are checked when the stream is built (train_resume)
        self._restored = restored
        self._n_workers = restored.get("n_workers")
        self._shards = restored.get("shards")


class ResampledReading:
    """The resampled path of ``LaionStream``: shard choice, per-shard reading, shuffle, positions and restore.

    Same draws as a plain resampled reader (``rng.choice`` over the shard list, a shuffle buffer that swaps a
    random slot out), so adding positions changed no stream; what it adds is that the state of each step is
    held in ``self._pos`` and can be continued from.
    """

    def _resampled(self, rank: int, worker: int):
        """Usable samples forever, each ``state_every``-th carrying this worker's position (``STATE_KEY``)."""
        start = (self.resume or {}).get(worker)
        self._shards_rng = random.Random(f"{self.seed}-{rank}-{worker}-{self.epoch}-shards")  # str seeds are stable
        self._shuffle_rng = random.Random(f"{self.seed}-{rank}-{worker}-{self.epoch}-shuffle")
        self._pos = {"url": None, "read": 0, "yielded": 0}
        buf: list[dict] = []
        if start is not None:
            set_rng_state(self._shards_rng, start["shards_rng"])
            set_rng_state(self._shuffle_rng, start["shuffle_rng"])
            self._pos = {"url": start["url"], "read": int(start["read"]), "yielded": int(start["yielded"])}
            buf = self._materialize(start["buffer"])
        self._buf = buf  # the shuffle buffer (empty without shuffling): part of every position
        samples = self._read_from(self._pos["url"], self._pos["read"])
        if self.shuffle_buffer > 1:
            samples = self._shuffled(samples, buf)
        for s in samples:
            s["skipped"], self._pending = self._pending, 0
            s["filtered"], self._pending_filtered = self._pending_filtered, 0
            s.pop("_ref", None)
            self._pos["yielded"] += 1
            if self.state_every and self._pos["yielded"] % self.state_every == 0:
                s[STATE_KEY] = self._position(worker)
            yield s

    def _position(self, worker: int) -> dict:
        return {"version": VERSION, "worker": worker, "shards": fingerprint(self.urls),
                "shards_rng": rng_state(self._shards_rng), "shuffle_rng": rng_state(self._shuffle_rng),
                "url": self._pos["url"], "read": self._pos["read"], "yielded": self._pos["yielded"],
                "buffer": [list(b["_ref"]) for b in self._buf]}

    def _read_from(self, url: int | None, read: int):
        """Decoded usable samples: the rest of shard ``url`` after its first ``read``, then shards chosen at random."""
        while True:
            if url is None:
                url, read = self._shards_rng.choice(range(len(self.urls))), 0
            self._pos["url"], self._pos["read"] = url, read
            self._guard.shard_start()
            for ordinal, raw in enumerate(self._shard_raws(self.urls[url])):
                if ordinal < read:
                    continue  # read before the restart: grouped from the tar, never decoded
                self._pos["read"] = ordinal + 1
                sample = self._decode(raw)
                if sample is None:
                    self._guard.check()
                    continue
                self._guard.usable()
                sample["_ref"] = (url, ordinal)
                yield sample
            self._shard_read(self.urls[url])
            url = None

    def _shuffled(self, samples, buf: list[dict]):
        """Buffer shuffle of an endless stream: each new sample takes a random slot, the one it replaces goes out."""
        for s in samples:
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                continue
            i = self._shuffle_rng.randrange(len(buf))
            buf[i], s = s, buf[i]
            yield s

    def _materialize(self, refs: list) -> list[dict]:
        """The samples a saved shuffle buffer referred to, re-read and decoded, in the buffer's order."""
        wanted: dict[int, set[int]] = {}
        for url, ordinal in refs:
            wanted.setdefault(int(url), set()).add(int(ordinal))
        found: dict[tuple[int, int], dict] = {}
        for url, ordinals in wanted.items():
            last = max(ordinals)
            for ordinal, raw in enumerate(self._shard_raws(self.urls[url])):
                if ordinal in ordinals:
                    sample = self._decode(raw)
                    if sample is not None:
                        sample["_ref"] = (url, ordinal)
                        found[(url, ordinal)] = sample
                if ordinal >= last:
                    break
        # a shard drawn twice can put one sample in the buffer twice: each slot gets its own copy
        lost = sum((int(u), int(o)) not in found for u, o in refs)
        if lost:
            log.warning("%d samples of the saved shuffle buffer could not be read again (their shard vanished or "
                        "changed): the resumed stream is not exactly the interrupted one", lost)
            for _ in range(lost):
                self._skip("lost_on_resume", "")
        return [dict(found[(int(u), int(o))]) for u, o in refs if (int(u), int(o)) in found]
