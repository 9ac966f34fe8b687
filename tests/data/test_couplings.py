"""The coupling format's one owner (``data.couplings``): the writer, the reader and the shapes world use it,
and what they write is byte for byte what the code before it wrote (``fixtures/couplings_v1``)."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from data import couplings
from data.shards import npy_bytes
from instaflow.flow.noise import seeded_noise

FIXTURE = Path(__file__).parent / "fixtures" / "couplings_v1"
CLOCK = 1000.5  # the fixture's fixed clock: written_at, start_time and end_time are the only varying fields
URL = "/data/in/00007.tar"


def _fixture_samples():
    """The fixture script's couplings, regenerated with its generator: (plain, full)."""
    g = torch.Generator().manual_seed(7)

    def samples(with_x0, with_states):
        res = []
        for i, cap in enumerate(["a red circle", "", "ünïcode caption"]):
            s = {"key": f"0000{i}0001", "seed": 100 + i, "caption": cap, "url": URL, "worker": 0,
                 "x1": torch.randn(4, 4, 4, generator=g) * 3}
            if with_x0:
                s["x0"] = torch.randn(4, 4, 4, generator=g)
            if with_states:
                s["text_states"] = torch.randn(5, 8, generator=g)
            res.append(s)
        return res[::-1]  # the writer sorts by key

    return samples(False, False), samples(True, True)


@pytest.fixture
def fixed_clock(monkeypatch):
    import time

    monkeypatch.setattr(time, "time", lambda: CLOCK)


def test_the_writer_writes_the_pre_refactor_bytes(tmp_path, fixed_clock):
    from callbacks.pair_writer import CouplingWriter

    for name, samples, dtype in zip(("plain", "full"), _fixture_samples(), ("float16", "float32")):
        (tmp_path / name).mkdir()
        w = CouplingWriter(str(tmp_path / name), latent_dtype=dtype)
        w._rank, w._world = 1, 2
        w._buffers[URL] = samples
        w._flush(URL)
        for f in ("00007.tar", "00007_stats.json"):
            assert (tmp_path / name / f).read_bytes() == (FIXTURE / name / f).read_bytes(), (name, f)
        assert w._written == {"00007.tar": ["000000001", "000010001", "000020001"]}
        assert w.is_done(URL)


def test_the_format_functions_write_the_pre_refactor_bytes(tmp_path):
    _, full = _fixture_samples()
    keys = couplings.write_coupling_shard(tmp_path / "00007.tar", full, URL, "float32")
    assert (tmp_path / "00007.tar").read_bytes() == (FIXTURE / "full" / "00007.tar").read_bytes()
    couplings.write_mark(tmp_path / "00007.tar", couplings.coupling_stats(keys, URL, CLOCK, 1, 2))
    assert (tmp_path / "00007_stats.json").read_bytes() == (FIXTURE / "full" / "00007_stats.json").read_bytes()
    record = json.loads((FIXTURE / "full" / "generation.json").read_text())
    couplings.write_generation_record(tmp_path, record)
    assert (tmp_path / "generation.json").read_bytes() == (FIXTURE / "full" / "generation.json").read_bytes()
    assert couplings.read_generation_record(tmp_path) == record
    couplings.write_manifest(tmp_path, 1, 2, {"00007.tar": ["a", "b"]}, 0)
    assert (tmp_path / "manifest_rank1.json").read_bytes() == (FIXTURE / "full" / "manifest_rank1.json").read_bytes()


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_the_shapes_world_writes_the_pre_refactor_mark_and_members(tmp_path, fixed_clock):
    from data.shapes import shard_complete, write_shard

    write_shard(tmp_path / "00003.tar", 3, 21, 30, 2, 8)
    assert (tmp_path / "00003_stats.json").read_bytes() == (FIXTURE / "shapes" / "00003_stats.json").read_bytes()
    got, want = _members(tmp_path / "00003.tar"), _members(FIXTURE / "shapes" / "00003.tar")
    assert [n for n, _ in got] == [n for n, _ in want]
    # JPEG bytes are Pillow's (the fixture: Pillow 12.3.0); the text members and the mark are ours
    assert [(n, b) for n, b in got if not n.endswith(".jpg")] == [(n, b) for n, b in want if not n.endswith(".jpg")]
    assert shard_complete(tmp_path / "00003.tar", 3)


def test_the_reader_decodes_what_the_writer_encodes():
    plain, full = _fixture_samples()
    for s in full:
        raw = {"__key__": s["key"], **{n.split(".", 1)[1]: b for n, b in couplings.encode_coupling(s, URL, "float32")}}
        got = couplings.decode_coupling(raw)
        assert got["key"] == s["key"] and got["caption"] == s["caption"] and got["seed"] == s["seed"]
        torch.testing.assert_close(got["x1"], s["x1"])
        torch.testing.assert_close(got["x0"], s["x0"])
        torch.testing.assert_close(got["text_states"], s["text_states"].half().float())
    s = plain[0]
    raw = {"__key__": s["key"], **{n.split(".", 1)[1]: b for n, b in couplings.encode_coupling(s, URL)}}
    got = couplings.decode_coupling(raw)
    torch.testing.assert_close(got["x1"], s["x1"].half().float())
    assert got["x1"].dtype == torch.float32 and "text_states" not in got
    torch.testing.assert_close(got["x0"], seeded_noise([s["seed"]], (4, 4, 4))[0])  # x0 from the seed


def _raw(**members):
    x1 = npy_bytes(torch.zeros(4, 2, 2), "float16")
    base = {"__key__": "k", "txt": b"a cat", "json": json.dumps({"seed": 3}).encode(), "x1.npy": x1}
    return {k: v for k, v in {**base, **members}.items() if v is not None}


@pytest.mark.parametrize("members, reason", [
    ({"x1.npy": None}, "missing_x1"),
    ({"txt": b"\xff\xfe"}, "bad_caption_encoding"),
    ({"txt": None}, "missing_caption"),
    ({"json": b"[1, 2"}, "bad_coupling"),
    ({"json": None}, "bad_coupling"),  # no seed and no x0
    ({"x1.npy": b"not a npy"}, "bad_coupling"),
    ({"x0.npy": pickle.dumps([1, 2])}, "bad_coupling"),
    ({"x1.npy": npy_bytes(torch.full((4, 2, 2), float("nan")), "float16")}, "non_finite_latent"),
])
def test_a_bad_coupling_is_a_named_skip(members, reason):
    got = couplings.decode_coupling(_raw(**members))
    assert isinstance(got, couplings.Skip) and got.reason == reason


def test_a_pickled_npy_is_refused_never_unpickled():
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    got = couplings.decode_coupling(_raw(**{"x1.npy": buf.getvalue()}))
    assert isinstance(got, couplings.Skip) and "allow_pickle" in got.detail


def test_an_empty_caption_is_an_unconditional_coupling():
    got = couplings.decode_coupling(_raw(txt=b"  "))
    assert got["caption"] == "" and got["seed"] == 3


def test_the_completion_mark(tmp_path):
    shard = tmp_path / "00001.tar"
    assert couplings.mark_path(shard) == tmp_path / "00001_stats.json"
    assert not couplings.is_complete(shard)
    shard.write_bytes(b"\0" * 1024)
    assert not couplings.is_complete(shard)  # a shard without its mark: a kill before the mark
    couplings.mark_path(shard).write_text('{"count": 2, "ke')  # a mark cut by a kill
    assert couplings.read_mark(shard) is None and not couplings.is_complete(shard)
    couplings.mark_path(shard).write_text('{"count": "2"}')
    assert not couplings.is_complete(shard)
    couplings.write_mark(shard, {"count": 2, "keys": ["a", "b"]})
    assert couplings.read_mark(shard) == {"count": 2, "keys": ["a", "b"]} and couplings.is_complete(shard)
    with pytest.raises(ValueError, match="integer 'count'"):
        couplings.write_mark(shard, {"keys": []})
    other = tmp_path / "elsewhere_stats.json"  # a mark named otherwise (the shapes world: by shard number)
    couplings.write_mark(shard, {"count": 1}, mark=other)
    assert couplings.read_mark(shard, other) == {"count": 1}


def test_a_missing_or_cut_generation_record_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="no generation.json in .*run the coupling stage"):
        couplings.read_generation_record(tmp_path)
    (tmp_path / "generation.json").write_text('{"teacher": ')
    with pytest.raises(ValueError, match="not a JSON object .*rerun the coupling stage"):
        couplings.read_generation_record(tmp_path)


def test_the_writer_refuses_a_latent_dtype_numpy_cannot_store(tmp_path):
    from callbacks.pair_writer import CouplingWriter

    with pytest.raises(ValueError, match="latent_dtype must be one of .*bfloat16"):
        CouplingWriter(str(tmp_path), latent_dtype="bfloat16")
