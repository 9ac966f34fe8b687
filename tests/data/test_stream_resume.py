"""A resampled stream continued from a saved position is the stream that was interrupted (``data.stream_state``).

The DataLoader runs 2 workers and a shuffle buffer, as training does; positions are recorded the way the
datamodule records them (from the batches taken, not from what the workers prefetched).
"""

from __future__ import annotations

import itertools
import os

import pytest
from torch.utils.data import DataLoader

from data.laion import LaionStream, collate
from data.stream_state import STATE_KEY, fingerprint, worker_offset
from tests.data.test_laion import tiny_shards  # noqa: F401  (fixture)

B = 4


def loader(shards, workers: int, resume=None, offset: int = 0, epoch: int = 0) -> DataLoader:
    stream = LaionStream(shards, resolution=32, resampled=True, shuffle_buffer=16, captions_only=True, seed=5,
                         epoch=epoch, state_every=B, resume=resume, worker_offset=offset)
    return DataLoader(stream, batch_size=B, num_workers=workers, collate_fn=collate)


def take(dl: DataLoader, n: int, positions: dict | None = None) -> list[list[str]]:
    """The keys of the first ``n`` batches; each batch's position recorded by worker, as the datamodule does."""
    out = []
    for batch in itertools.islice(iter(dl), n):
        state = batch.pop(STATE_KEY)
        if positions is not None:
            positions[state["worker"]] = state
        out.append(batch["key"])
    return out


@pytest.mark.parametrize("workers,stop", [(2, 7), (2, 10), (0, 5)])
def test_a_stream_continued_from_its_positions_is_the_uninterrupted_stream(tiny_shards, workers, stop):  # noqa: F811
    shards = tiny_shards.paths
    whole = take(loader(shards, workers), stop + 12)
    positions: dict = {}
    assert take(loader(shards, workers), stop, positions) == whole[:stop]
    # a new DataLoader starts at worker 0: worker 0 continues the virtual worker whose turn it was
    resumed = take(loader(shards, workers, resume=positions, offset=worker_offset(stop, workers)), 12)
    assert resumed == whole[stop:]
    # each batch carries a position; a fresh stream seeded otherwise gives other batches (the test can fail)
    assert take(loader(shards, workers, epoch=stop), 12) != whole[stop:]


def test_a_vanished_shard_loses_only_its_buffered_samples_counted(tiny_shards, tmp_path):  # noqa: F811
    shards = [str(tmp_path / f"{i}.tar") for i in range(len(tiny_shards.paths))]
    for src, dst in zip(tiny_shards.paths, shards):
        os.link(src, dst)
    positions: dict = {}
    take(loader(shards, 0), 6, positions)
    buffered = {shards[u] for u, _ in positions[0]["buffer"]}
    gone = sorted(buffered)[0]
    os.unlink(gone)
    stream = LaionStream(shards, resolution=32, resampled=True, shuffle_buffer=16, captions_only=True, seed=5,
                         state_every=B, resume=positions)
    batch = next(iter(DataLoader(stream, batch_size=B, collate_fn=collate)))
    lost = sum(1 for u, _ in positions[0]["buffer"] if shards[u] == gone)
    assert lost > 0 and batch["skipped"] >= lost  # counted, never silent
    assert len(batch["key"]) == B


def test_positions_are_plain_data_and_name_their_shard_list(tiny_shards):  # noqa: F811
    positions: dict = {}
    take(loader(tiny_shards.paths, 0), 3, positions)
    pos = positions[0]
    assert pos["shards"] == fingerprint(tiny_shards.paths) != fingerprint(tiny_shards.paths[:-1])
    assert pos["yielded"] == 3 * B and len(pos["buffer"]) == 16

    def plain(x) -> bool:  # what a weights-only checkpoint load accepts without any class
        if isinstance(x, dict):
            return all(isinstance(k, (str, int)) and plain(v) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return all(plain(v) for v in x)
        return x is None or isinstance(x, (int, float, str, bool))

    assert plain(pos)
