"""The LAION img2dataset-layout WebDataset reader: exact passes, splitting, resampling, bad input."""

from __future__ import annotations

import io
import itertools
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

torch.set_num_threads(1)  # the machine is shared with a training job

import data.laion as laion  # noqa: E402
from data.laion import LaionDataModule, LaionStream, collate, expand_shards  # noqa: E402
from data.shapes import brace_pattern, make_sample, write_shard, write_split  # noqa: E402

N_SHARDS, PER_SHARD = 5, 8  # 40 samples, enough shards for 2 ranks x 2 workers


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    """Each test starts as rank 0 of 1, worker 0 of 1, whatever the environment says."""
    for var in ("RANK", "WORLD_SIZE", "WORKER", "NUM_WORKERS", "WDS_SECURE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def tiny_shards(tmp_path):
    """A few small shapes shards: paths, brace pattern, and every key with its caption."""
    paths = write_split(tmp_path / "shapes", "train", N_SHARDS * PER_SHARD, samples_per_shard=PER_SHARD,
                        seed=0, resolution=32, progress=False)
    captions = {}
    for shard in range(N_SHARDS):
        for i in range(PER_SHARD):
            captions[f"{shard:05d}{i:04d}"] = make_sample(0, shard * PER_SHARD + i)[1].caption
    return SimpleNamespace(dir=tmp_path / "shapes" / "train", paths=[str(p) for p in paths],
                           pattern=brace_pattern(tmp_path / "shapes" / "train", N_SHARDS), captions=captions)


def _jpg(index: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    make_sample(seed, index)[0].save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return str(path)


def _keys(stream) -> list[str]:
    return [s["key"] for s in stream]


# -- finite passes ---------------------------------------------------------------------------

def test_finite_pass_reads_every_sample_once(tiny_shards):
    assert expand_shards(tiny_shards.pattern) == tiny_shards.paths
    stream = LaionStream(tiny_shards.pattern, resolution=32, resampled=False)
    samples = list(stream)
    keys = [s["key"] for s in samples]
    assert len(keys) == len(set(keys)) == N_SHARDS * PER_SHARD
    assert set(keys) == set(tiny_shards.captions)
    assert keys == sorted(keys)  # one worker, no shuffle: shard order, then tar order
    for s in samples:
        assert isinstance(s["caption"], str) and s["caption"] == tiny_shards.captions[s["key"]]
        assert s["meta"]["key"] == s["key"] and s["meta"]["scene"]["caption"] == s["caption"]
        x = s["pixel_values"]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert x.min() >= -1.0 and x.max() <= 1.0
        assert s["skipped"] == 0
    assert stream.skips == Counter()
    # at the native resolution the tensor is the decoded JPEG, exactly
    with tarfile.open(tiny_shards.paths[1]) as t:
        ref = np.asarray(Image.open(io.BytesIO(t.extractfile("000010003.jpg").read())).convert("RGB"))
    x = next(s for s in samples if s["key"] == "000010003")["pixel_values"]
    assert torch.equal(((x + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(ref.copy()))
    # a second pass over the same stream gives the same samples
    assert _keys(stream) == keys


def test_shard_specs_lists_and_double_colon(tiny_shards):
    a, b = tiny_shards.paths[:2]
    assert expand_shards([a, b]) == [a, b] == expand_shards(f"{a}::{b}")
    assert len(_keys(LaionStream(f"{a}::{b}", resolution=32))) == 2 * PER_SHARD
    with pytest.raises(ValueError, match="no shards"):
        LaionStream([], resolution=32)


def test_resize_and_centre_crop_non_square(tmp_path):
    # 64x48: the centre 48x48 is red above, blue below; 8-px green bars left and right get cropped off
    a = np.zeros((48, 64, 3), np.uint8)
    a[:, :] = (0, 255, 0)
    a[:24, 8:56] = (255, 0, 0)
    a[24:, 8:56] = (0, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    path = _write_tar(tmp_path / "wide.tar", [("wide.png", buf.getvalue()), ("wide.txt", b"a wide image")])
    for res in (24, 16):
        (s,) = list(LaionStream(path, resolution=res))
        x = s["pixel_values"]
        assert s["caption"] == "a wide image" and s["meta"] is None
        assert x.shape == (3, res, res) and x.min() >= -1 and x.max() <= 1
        img = ((x + 1) * 127.5).permute(1, 2, 0).numpy()
        inner = img[:, 1:-1]  # the crop edge may carry a little resampling blur
        assert (inner[..., 1] < 60).all(), "the green side bars must be cropped away"
        assert (img[: res // 2 - 1, 1:-1, 0] > 200).all() and (img[res // 2 + 1:, 1:-1, 2] > 200).all()
        # same as cropping the centre square first, then resizing
        ref = np.asarray(Image.fromarray(a).crop((8, 0, 56, 48)).resize((res, res), Image.BICUBIC), float)
        assert np.abs(img - ref)[:, 1:-1].mean() < 6


def test_pipe_urls(tiny_shards):
    a, b = tiny_shards.paths[:2]
    keys = _keys(LaionStream([f"pipe:cat {a}", f"pipe:cat {b}"], resolution=32))
    assert keys == _keys(LaionStream([a, b], resolution=32))
    assert len(keys) == 2 * PER_SHARD


def test_captions_only_never_decodes_images(tiny_shards, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("load_image called in captions_only mode")

    monkeypatch.setattr(laion, "load_image", boom)
    stream = LaionStream(tiny_shards.pattern, resolution=32, captions_only=True)
    samples = list(stream)
    assert len(samples) == N_SHARDS * PER_SHARD and stream.skips == Counter()
    assert all("pixel_values" not in s for s in samples)
    assert {s["key"]: s["caption"] for s in samples} == tiny_shards.captions
    assert all(s["meta"]["key"] == s["key"] for s in samples)
    batch = collate(samples[:4])
    assert "pixel_values" not in batch and len(batch["caption"]) == 4
    # the patch is live: decoding images with it skips every sample as bad_image
    image_stream = LaionStream(tiny_shards.paths[0], resolution=32)
    assert list(image_stream) == [] and image_stream.skips == Counter(bad_image=PER_SHARD)


# -- bad input ----------------------------------------------------------------------------------

def _bad_inputs(tmp_path: Path, good_paths: list[str]) -> tuple[list[str], Counter]:
    """Two good shards, a shard of bad samples, a shard cut in the middle of a member.

    Returns the shard list (ordered so that 2 workers get [good, bad] and [good, cut], each ending
    in skips) and the skips it must produce.
    """
    meta = lambda k: json.dumps({"key": k}).encode()  # noqa: E731
    bad = _write_tar(tmp_path / "bad.tar", [
        ("b0.jpg", _jpg(100)), ("b0.txt", b"a good one"), ("b0.json", meta("b0")),
        ("b1.jpg", np.random.default_rng(1).bytes(600)), ("b1.txt", b"corrupt image"), ("b1.json", meta("b1")),  # bad_image
        ("b2.jpg", _jpg(102)), ("b2.json", meta("b2")),  # no caption: missing_caption
        ("b3.jpg", _jpg(103)), ("b3.txt", b"\xff\xfe\xfa"), ("b3.json", meta("b3")),  # bad_caption_encoding
        ("b4.jpg", _jpg(104)), ("b4.txt", b"another good one"),  # no json: fine, meta None
        ("b5.jpg", _jpg(105)), ("b5.txt", b"  \n"), ("b5.json", meta("b5")),  # empty: missing_caption
    ])
    # a good shard with its own keys, cut in the middle of the .txt of its 4th sample
    whole = tmp_path / "whole.tar"
    write_shard(whole, 7, 7, 0, 6, 32)
    with tarfile.open(whole) as t:
        txt = t.getmember("000070003.txt")
    data = whole.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: txt.offset_data + txt.size // 2])
    shards = [good_paths[0], good_paths[1], bad, str(cut)]
    # the cut shard: 000070000..2 are read; 000070003 has only its .jpg (missing_caption); the tar
    # error counts once as unreadable_tar however many times tarfile raises for it
    skips = Counter(bad_image=1, missing_caption=3, bad_caption_encoding=1, unreadable_tar=1)
    return shards, skips


GOOD_BAD_KEYS = {"b0", "b4"}
CUT_KEYS = {"000070000", "000070001", "000070002"}


def test_bad_input_is_skipped_and_counted(tiny_shards, tmp_path, caplog):
    shards, expected = _bad_inputs(tmp_path, tiny_shards.paths)
    good_keys = {k for k in tiny_shards.captions if k[:5] in ("00000", "00001")} | GOOD_BAD_KEYS | CUT_KEYS
    with caplog.at_level(logging.WARNING, logger="data.laion"):
        stream = LaionStream(shards, resolution=32)
        samples = list(stream)
    keys = [s["key"] for s in samples]
    assert len(keys) == len(set(keys)) and set(keys) == good_keys
    assert stream.skips == expected
    assert sum(s["skipped"] for s in samples) == sum(expected.values()) == 6
    # a sample carries the skips just before it; the last sample also carries those after it (here the
    # cut shard's partial sample and its tar error), which no later sample could report
    by_key = {s["key"]: s for s in samples}
    assert by_key["b0"]["skipped"] == 0 and by_key["b4"]["skipped"] == 3  # b1, b2, b3
    assert by_key["000070000"]["skipped"] == 1  # b5, the last of bad.tar
    assert samples[-1]["key"] == "000070002" and samples[-1]["skipped"] == 2  # 000070003 + unreadable_tar
    assert by_key["b4"]["meta"] is None and by_key["b0"]["meta"] == {"key": "b0"}
    assert "skipped a sample (bad_image" in caplog.text and "unreadable_tar" in caplog.text
    # require_meta turns the sample without json into a counted skip too
    strict = LaionStream(shards, resolution=32, require_meta=True)
    assert "b4" not in _keys(strict) and strict.skips["missing_meta"] == 1


def test_bad_input_through_dataloader_workers(tiny_shards, tmp_path):
    shards, expected = _bad_inputs(tmp_path, tiny_shards.paths)
    loader = DataLoader(LaionStream(shards, resolution=32), batch_size=3, num_workers=2, collate_fn=collate)
    keys, skipped = [], 0
    for batch in loader:
        assert batch["pixel_values"].shape == (len(batch["key"]), 3, 32, 32)
        assert isinstance(batch["skipped"], int)
        keys += batch["key"]
        skipped += batch["skipped"]
    assert len(keys) == len(set(keys)) == 2 * PER_SHARD + len(GOOD_BAD_KEYS) + len(CUT_KEYS)
    assert skipped == sum(expected.values())


@pytest.mark.parametrize("where, kept, skips", [
    # cut in the .jpg of the 4th sample: that sample is gone whole (nothing of it was read)
    ("000070003.jpg", 3, Counter(unreadable_tar=1)),
    # cut in its .json: it has an image and a caption, so it is kept, without meta
    ("000070003.json", 4, Counter(unreadable_tar=1)),
])
def test_truncated_tar_other_cuts(tmp_path, where, kept, skips):
    whole = tmp_path / "whole.tar"
    write_shard(whole, 7, 7, 0, 6, 32)
    with tarfile.open(whole) as t:
        m = t.getmember(where)
    (tmp_path / "cut.tar").write_bytes(whole.read_bytes()[: m.offset_data + m.size // 2])
    stream = LaionStream([str(tmp_path / "cut.tar"), str(whole)], resolution=32)
    samples = list(stream)
    cut_keys = [s["key"] for s in samples[:kept]]
    assert cut_keys == [f"00007{i:04d}" for i in range(kept)]
    # the next shard starts clean: a cut sample never merges into its first sample
    assert [s["key"] for s in samples[kept:]] == [f"00007{i:04d}" for i in range(6)]
    assert all(s["meta"] is not None for s in samples[kept:])
    assert stream.skips == skips and sum(s["skipped"] for s in samples) == sum(skips.values())
    if where.endswith(".json"):
        assert samples[kept - 1]["meta"] is None and "pixel_values" in samples[kept - 1]


def test_corrupt_and_missing_shards(tiny_shards, tmp_path):
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(np.random.default_rng(2).bytes(3000))
    missing = str(tmp_path / "nope" / "00000.tar")
    shards = [missing, tiny_shards.paths[0], str(garbage), tiny_shards.paths[1], missing]
    stream = LaionStream(shards, resolution=32)
    samples = list(stream)
    assert len(samples) == 2 * PER_SHARD
    assert stream.skips == Counter(missing_shard=2, unreadable_tar=1)
    assert sum(s["skipped"] for s in samples) == 3
    # missing_shards: error names the shard that vanished (a shard deleted from shared storage mid-run)
    with pytest.raises(FileNotFoundError, match=r"nope/00000.tar does not exist.*missing_shards: skip"):
        list(LaionStream(shards, resolution=32, missing_shards="error"))
    with pytest.raises(ValueError, match="missing_shards must be one of"):
        LaionStream(shards, missing_shards="ignore")


def test_resampled_all_missing_raises(tmp_path):
    stream = LaionStream([str(tmp_path / f"{i}.tar") for i in range(3)], resolution=32, resampled=True)
    with pytest.raises(laion.EmptyStreamError, match="could not be opened \(no such file\): check the path"):
        next(iter(stream))
    # it stops once each of the 3 shards has failed (resampling draws some twice), not after a fixed count
    assert set(stream.skips) == {"missing_shard"} and 3 <= stream.skips["missing_shard"] < 30


# -- splitting over ranks and workers ---------------------------------------------------------

def test_split_over_ranks_and_workers(tiny_shards, monkeypatch):
    seen = []
    per_process = {}
    for rank in range(2):
        for worker in range(2):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", "2")
            monkeypatch.setenv("WORKER", str(worker))
            monkeypatch.setenv("NUM_WORKERS", "2")
            keys = _keys(LaionStream(tiny_shards.pattern, resolution=32, captions_only=True))
            assert keys, (rank, worker)
            per_process[rank, worker] = {k[:5] for k in keys}
            seen += keys
    assert len(seen) == len(set(seen)) and set(seen) == set(tiny_shards.captions)
    # rank r reads shards r, r+2, ...; its worker w every other one of those
    assert per_process == {(0, 0): {"00000", "00004"}, (0, 1): {"00002"}, (1, 0): {"00001"}, (1, 1): {"00003"}}


def test_too_few_shards_for_ranks_and_workers(tiny_shards, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("WORKER", "0")
    monkeypatch.setenv("NUM_WORKERS", "2")
    stream = LaionStream(tiny_shards.paths[:3], resolution=32)
    with pytest.raises(ValueError, match=r"3 shards cannot be split over 2 ranks x 2 workers"):
        list(stream)


# -- resampled training streams and shuffling --------------------------------------------------

def _take(stream, n: int) -> list[str]:
    return [s["key"] for s in itertools.islice(iter(stream), n)]


def test_resampled_is_infinite_and_seeded(tiny_shards, monkeypatch):
    total = N_SHARDS * PER_SHARD
    kw = dict(resolution=32, resampled=True, shuffle_buffer=4, captions_only=True)
    base = _take(LaionStream(tiny_shards.pattern, seed=3, **kw), 2 * total)
    assert len(base) == 2 * total  # more than a pass holds
    assert set(base) <= set(tiny_shards.captions) and len(set(base)) < len(base)
    assert base == _take(LaionStream(tiny_shards.pattern, seed=3, **kw), 2 * total)  # same seed, same stream
    n = 60
    assert _take(LaionStream(tiny_shards.pattern, seed=4, **kw), n) != base[:n]
    assert _take(LaionStream(tiny_shards.pattern, seed=3, epoch=1, **kw), n) != base[:n]
    # other ranks and other workers draw other streams
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert _take(LaionStream(tiny_shards.pattern, seed=3, **kw), n) == base[:n]  # rank 0 is rank 0
    monkeypatch.setenv("RANK", "1")
    rank1 = _take(LaionStream(tiny_shards.pattern, seed=3, **kw), n)
    assert rank1 != base[:n]
    assert rank1 == _take(LaionStream(tiny_shards.pattern, seed=3, **kw), n)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("NUM_WORKERS", "2")
    monkeypatch.setenv("WORKER", "1")
    assert _take(LaionStream(tiny_shards.pattern, seed=3, **kw), n) != base[:n]
    # a resampled stream needs no more shards than ranks x workers
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert len(_take(LaionStream(tiny_shards.paths[:1], seed=3, **kw), 20)) == 20


def test_shuffle_buffer_keeps_the_multiset(tiny_shards):
    plain = _keys(LaionStream(tiny_shards.pattern, resolution=32, captions_only=True))
    shuffled = _keys(LaionStream(tiny_shards.pattern, resolution=32, captions_only=True, shuffle_buffer=8, seed=1))
    assert shuffled != plain and sorted(shuffled) == sorted(plain) and len(shuffled) == len(plain)
    again = _keys(LaionStream(tiny_shards.pattern, resolution=32, captions_only=True, shuffle_buffer=8, seed=1))
    other = _keys(LaionStream(tiny_shards.pattern, resolution=32, captions_only=True, shuffle_buffer=8, seed=2))
    assert again == shuffled and other != shuffled and sorted(other) == sorted(plain)
    # skips are still reported exactly when a shuffle buffer delays the samples
    stream = LaionStream(tiny_shards.paths[:2] + ["/nonexistent/x.tar"], resolution=32, shuffle_buffer=5)
    samples = list(stream)
    assert len(samples) == 2 * PER_SHARD and sum(s["skipped"] for s in samples) == 1


# -- the data module ----------------------------------------------------------------------------

def test_datamodule_loaders(tiny_shards, tmp_path):
    val = write_split(tmp_path / "shapes", "val", 10, samples_per_shard=5, seed=0, progress=False)
    dm = LaionDataModule(train=tiny_shards.pattern, val=f"{val[0]}::{val[1]}", resolution=16, batch_size=4,
                         eval_batch_size=3, num_workers=0, shuffle_buffer=8, seed=0)
    batches = list(itertools.islice(iter(dm.train_dataloader()), 15))  # 60 samples of 40: it resamples
    for b in batches:
        assert b["pixel_values"].shape == (4, 3, 16, 16) and b["pixel_values"].dtype == torch.float32
        assert isinstance(b["caption"], list) and len(b["caption"]) == 4
        assert all(isinstance(c, str) and c for c in b["caption"])
        assert isinstance(b["skipped"], int) and b["skipped"] == 0
        assert all(tiny_shards.captions[k] == c for k, c in zip(b["key"], b["caption"]))
    train_stream = dm.stream("train")
    assert train_stream.resampled and train_stream.shuffle_buffer == 8 and train_stream.epoch == 0
    # the val loader is one exact pass, unshuffled
    val_batches = list(dm.val_dataloader())
    assert [len(b["key"]) for b in val_batches] == [3, 3, 3, 1]
    val_keys = [k for b in val_batches for k in b["key"]]
    assert len(set(val_keys)) == 10 and val_keys == sorted(val_keys)
    assert not dm.stream("val").resampled and dm.stream("val").shuffle_buffer == 0
    assert dm.stream("val", captions_only=True).captions_only  # overrides reach the stream
    for stage, loader in (("test", dm.test_dataloader), ("predict", dm.predict_dataloader)):
        with pytest.raises(ValueError, match=f"'{stage}'"):
            loader()


def test_cut_sample_never_merges_into_the_next_shard(tmp_path):
    # the next shard starts with the very key the cut one broke off in (a re-written or copied shard)
    whole = tmp_path / "whole.tar"
    write_shard(whole, 7, 7, 0, 6, 32)
    with tarfile.open(whole) as t:
        m = t.getmember("000070003.json")
        rest = [(n, t.extractfile(n).read()) for n in ("000070003.jpg", "000070003.txt", "000070003.json")]
    (tmp_path / "cut.tar").write_bytes(whole.read_bytes()[: m.offset_data + m.size // 2])
    redo = _write_tar(tmp_path / "redo.tar", rest)
    stream = LaionStream([str(tmp_path / "cut.tar"), redo], resolution=32)
    samples = list(stream)
    assert [s["key"] for s in samples] == ["000070000", "000070001", "000070002", "000070003", "000070003"]
    assert samples[3]["meta"] is None and samples[4]["meta"]["key"] == "000070003"
    assert stream.skips == Counter(unreadable_tar=1)


# -- caption filters on LAION metadata ------------------------------------------------------------

def _laion_shard(tmp_path: Path) -> str:
    """One shard with LAION-style metadata: every sample fails exactly one filter, or none."""
    rows = [  # key, caption, meta (None: no .json)
        ("k0", "a dog running on a beach", {"punsafe": 0.01, "pwatermark": 0.1, "similarity": 0.33}),  # kept
        ("k1", "tiny", {"punsafe": 0.01, "pwatermark": 0.1, "similarity": 0.33}),  # too short
        ("k2", "x" * 81, {"punsafe": 0.01, "pwatermark": 0.1, "similarity": 0.33}),  # too long
        ("k3", "a nude painting of someone", {"punsafe": 0.9, "pwatermark": 0.1, "similarity": 0.33}),
        ("k4", "stock photo of a city street", {"punsafe": 0.01, "pwatermark": 0.8, "similarity": 0.33}),
        ("k5", "unrelated words in the alt text", {"punsafe": 0.01, "pwatermark": 0.1, "similarity": 0.1}),
        ("k6", "a cat on a sofa with no punsafe", {"pwatermark": 0.1, "similarity": 0.33}),  # field missing
        ("k7", "a red car parked near a tree", {"punsafe": None, "pwatermark": 0.1, "similarity": 0.33}),  # null
        ("k8", "a bowl of fruit on a table", None),  # no .json at all
        ("k9", "a man riding a horse at sunset", {"punsafe": 0.1, "pwatermark": 0.5, "similarity": 0.28}),  # on the bounds
    ]
    members = []
    for i, (key, caption, meta) in enumerate(rows):
        members += [(f"{key}.jpg", _jpg(i)), (f"{key}.txt", caption.encode())]
        if meta is not None:
            members.append((f"{key}.json", json.dumps(meta).encode()))
    return _write_tar(tmp_path / "laion.tar", members)


FILTERS = dict(min_caption_chars=5, max_caption_chars=80, max_punsafe=0.1, max_pwatermark=0.5, min_similarity=0.28)


@pytest.mark.parametrize("missing, kept", [("drop", ["k0", "k9"]), ("keep", ["k0", "k6", "k7", "k8", "k9"])])
def test_caption_filters_drop_by_their_own_reason(tmp_path, missing, kept, caplog):
    shard = _laion_shard(tmp_path)
    with caplog.at_level(logging.INFO, logger="data.laion"):
        stream = LaionStream(shard, resolution=16, filters={**FILTERS, "missing_field": missing})
        samples = list(stream)
    assert [s["key"] for s in samples] == kept
    expected = Counter(filtered_caption_length=2, filtered_punsafe=1, filtered_pwatermark=1, filtered_similarity=1)
    # k8 has no json: its first bounded field decides (punsafe); k6, k7 lack only punsafe
    expected += Counter({"filtered_missing_punsafe": 3} if missing == "drop" else {})
    assert stream.skips == expected
    assert not any(r in stream.skips for r in ("bad_image", "missing_caption", "missing_meta"))
    n_filtered = sum(expected.values())
    assert sum(s["skipped"] for s in samples) == sum(s["filtered"] for s in samples) == n_filtered
    batch = collate(samples)
    assert batch["skipped"] == batch["filtered"] == n_filtered
    # a filter doing its job is reported at INFO, corrupt data at WARNING
    recs = [r for r in caplog.records if "filtered_punsafe" in r.getMessage()]
    assert recs and all(r.levelno == logging.INFO for r in recs)


def test_caption_filters_counted_apart_from_corrupt_data(tiny_shards, tmp_path):
    shards, corrupt = _bad_inputs(tmp_path, tiny_shards.paths)
    # the shapes world's captions are 20-120 characters: bound them so some are filtered
    stream = LaionStream(shards, resolution=32, filters=dict(max_caption_chars=50))
    samples = list(stream)
    n_filtered = stream.skips["filtered_caption_length"]
    assert n_filtered > 0 and all(len(s["caption"]) <= 50 for s in samples)
    assert +Counter({k: v for k, v in stream.skips.items() if not k.startswith("filtered_")}) == corrupt
    assert sum(s["filtered"] for s in samples) == n_filtered
    assert sum(s["skipped"] for s in samples) == n_filtered + sum(corrupt.values())
    # no filters: the behaviour (and the counts) of before
    plain = LaionStream(shards, resolution=32)
    plain_samples = list(plain)
    assert plain.skips == corrupt and sum(s["filtered"] for s in plain_samples) == 0
    assert len(plain_samples) == len(samples) + n_filtered


def test_caption_filters_caption_only_and_datamodule(tmp_path, monkeypatch):
    from data.laion import CaptionFilters

    shard = _laion_shard(tmp_path)
    monkeypatch.setattr(laion, "load_image", lambda *a, **k: pytest.fail("image decoded in captions_only mode"))
    dm = LaionDataModule(predict=shard, captions_only=True, eval_batch_size=4, num_workers=0,
                         filters=CaptionFilters(**FILTERS))
    batches = list(dm.predict_dataloader())
    assert [k for b in batches for k in b["key"]] == ["k0", "k9"]
    assert sum(b["filtered"] for b in batches) == sum(b["skipped"] for b in batches) == 8
    assert dm.stream("predict").filters == CaptionFilters(**FILTERS)
    with pytest.raises(ValueError, match="missing_field must be 'keep' or 'drop'"):
        CaptionFilters(missing_field="ignore")
    # NaN and non-numbers count as missing; bounds are inclusive
    f = CaptionFilters(max_punsafe=0.5, missing_field="drop")
    assert f.reason("ok caption", {"punsafe": float("nan")}) == "filtered_missing_punsafe"
    assert f.reason("ok caption", {"punsafe": "high"}) == "filtered_missing_punsafe"
    assert f.reason("ok caption", {"punsafe": 0.5}) is None
    assert f.reason("ok caption", {"punsafe": 0.51}) == "filtered_punsafe"
    assert CaptionFilters().reason("", None) is None  # nothing set: nothing filtered


def test_caption_filters_from_yaml_and_misspelled_key(tmp_path, capsys):
    from tests.conftest import ROOT
    from data.laion import CaptionFilters
    from lightning_modules.cli import main

    base = str(ROOT / "experiments" / "base" / "default.yaml")
    exp = str(ROOT / "experiments" / "embedded" / "pairs_teacher.yaml")
    c = main(["-c", base, "-c", exp, "--data.init_args.filters.max_punsafe", "0.1",
              "--data.init_args.filters.missing_field", "keep"], run=False)
    assert c.datamodule.filters == CaptionFilters(max_punsafe=0.1, missing_field="keep")
    with pytest.raises(SystemExit):
        main(["-c", base, "-c", exp, "--data.init_args.filters.max_punsfe", "0.1"], run=False)
    assert "max_punsfe" in capsys.readouterr().err


def test_a_reader_left_without_samples_still_reports_its_skips(tiny_shards, tmp_path, caplog):
    """Every sample of a worker's shards bad: with report_empty one carrier brings the count; collate drops it."""
    empty = _write_tar(tmp_path / "empty.tar", [("e0.jpg", _jpg(0)), ("e0.txt", b""),  # empty caption
                                                ("e1.jpg", _jpg(1))])  # no caption at all
    quiet = LaionStream([empty], resolution=32)
    with caplog.at_level(logging.WARNING, logger="data.laion"):
        assert list(quiet) == [] and quiet.skips == Counter(missing_caption=2)
    assert "no sample left to report them on" in caplog.text  # without report_empty: said, not counted
    (carrier,) = list(LaionStream([empty], resolution=32, report_empty=True))
    assert carrier["carrier"] and carrier["skipped"] == 2
    batch = collate([carrier])
    assert batch["key"] == [] and batch["skipped"] == 2 and "pixel_values" not in batch
    # two workers: [good shard] and [the empty shard]; the batches' counts add up to every skip
    loader = DataLoader(LaionStream([tiny_shards.paths[0], empty], resolution=32, report_empty=True),
                        batch_size=3, num_workers=2, collate_fn=collate)
    batches = list(loader)
    assert sum(len(b["key"]) for b in batches) == PER_SHARD and sum(b["skipped"] for b in batches) == 2
    assert all(b["pixel_values"].shape[0] == len(b["key"]) for b in batches if b["key"])
