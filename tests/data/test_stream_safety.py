"""Streams at scale (issue 24): a resampled stream that can never yield stops with the cause instead of
spinning; images decode right (16-bit, EXIF) through JPEG/PNG/WebP decoders only; crafted metadata is a
counted skip, never a crash."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import signal
import struct
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import EpsImagePlugin, Image, TiffImagePlugin
from torch.utils.data import DataLoader

import data.stream_guard as stream_guard
from data.images import load_image
from data.laion import EmptyStreamError, LaionStream, collate
from data.pairs import CouplingDataModule
from data.shapes import make_sample, write_split
from tests.data.test_laion import _jpg
from tests.data.test_laion import _write_tar as _tar

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    """Each test starts as rank 0 of 1, worker 0 of 1, whatever the environment says."""
    for var in ("RANK", "WORLD_SIZE", "WORKER", "NUM_WORKERS"):
        monkeypatch.delenv(var, raising=False)


class StillSpinning(BaseException):
    """Not an Exception: the stream's own handlers (webdataset's, PIL's) must not swallow it."""


@contextlib.contextmanager
def within(seconds: float):
    """Fail (instead of hanging the suite) when the body runs longer than ``seconds``: the old stream spun forever."""
    def _late(*_):
        raise StillSpinning(f"still running after {seconds} s: the stream spins instead of raising")

    old = signal.signal(signal.SIGALRM, _late)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _first_error(loader: DataLoader) -> EmptyStreamError:
    """The error that the loader's first batch raises. Its traceback is dropped so that the workers shut down
    now (one kept in a reference cycle leaves them to the garbage collector, whose shutdown waits 5 s a worker)."""
    it = iter(loader)
    try:
        next(it)  # a worker's error is re-raised in the main process
    except EmptyStreamError as exn:
        exn.__traceback__ = None
        return exn
    finally:
        del it
    pytest.fail("the loader yielded a batch")


def _blank_shard(path: Path, n: int, good_at: int | None = None, prefix: str = "s") -> str:
    """``n`` samples with a blank caption, except a good one at ``good_at``."""
    img, members = _jpg(0), []
    for i in range(n):
        caption = b"a red circle on a white background" if i == good_at else b"   "
        members += [(f"{prefix}{i:05d}.jpg", img), (f"{prefix}{i:05d}.txt", caption)]
    return _tar(path, members)


# -- 1. a resampled stream that can never yield -------------------------------------------------------

def _empty_streams(tmp_path: Path) -> dict:
    """Three ways to hold no usable sample: 0-byte shards, blank captions, a filter that drops everything."""
    (tmp_path / "zero").mkdir()
    for i in range(3):
        (tmp_path / "zero" / f"{i:05d}.tar").write_bytes(b"")
    (tmp_path / "blank").mkdir()
    for i in range(3):
        _blank_shard(tmp_path / "blank" / f"{i:05d}.tar", 20, prefix=f"b{i}")
    write_split(tmp_path / "shapes", "train", 24, samples_per_shard=8, progress=False)
    return {
        "zero": (dict(shards=str(tmp_path / "zero" / "{00000..00002}.tar")), "unreadable_tar 6",
                 "not readable tar files"),
        "blank": (dict(shards=str(tmp_path / "blank" / "{00000..00002}.tar")), "missing_caption",
                  "no sample has what the stream needs"),
        "filtered": (dict(shards=str(tmp_path / "shapes" / "train" / "{00000..00002}.tar"),
                          filters=dict(max_caption_chars=3)), "filtered_caption_length",
                     "relax data.init_args.filters"),
    }


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("kind", ["zero", "blank", "filtered"])
def test_a_resampled_stream_without_usable_samples_raises_its_cause(tmp_path, kind, num_workers):
    kw, reason, hint = _empty_streams(tmp_path)[kind]
    stream = LaionStream(resolution=16, resampled=True, shuffle_buffer=4, **kw)
    loader = DataLoader(stream, batch_size=2, num_workers=num_workers, collate_fn=collate)
    t0 = time.monotonic()
    with within(30):
        msg = str(_first_error(loader))
    assert time.monotonic() - t0 < 30
    assert "yields no usable sample" in msg and kw["shards"] in msg  # the pattern as configured
    assert "3 of its 3 shards read through without one" in msg
    assert reason in msg and hint in msg and "every rank" in msg


def test_each_rank_raises_it_itself(tmp_path, monkeypatch):
    """All ranks resample the same shard list: rank 1 of 2 stops with the same cause, no collective needed."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    kw, reason, _ = _empty_streams(tmp_path)["blank"]
    with within(30), pytest.raises(EmptyStreamError, match=reason):
        next(iter(LaionStream(resolution=16, resampled=True, **kw)))


def test_a_rare_usable_sample_keeps_the_stream_alive(tmp_path):
    """One usable sample in 500 (4 shards of 125, one holding it): the stream yields it again and again."""
    shards = [_blank_shard(tmp_path / f"{i}.tar", 125, good_at=60 if i == 2 else None, prefix=f"r{i}")
              for i in range(4)]
    stream = LaionStream(shards, resolution=16, resampled=True)
    with within(60):
        samples = list(itertools.islice(iter(stream), 3))
    assert [s["key"] for s in samples] == ["r200060"] * 3
    assert samples[0]["pixel_values"].shape == (3, 16, 16)
    assert stream.skips["missing_caption"] >= 3 * 124  # it went through the blank ones between them


def test_the_skip_bound_stops_before_every_shard_was_read(tmp_path, monkeypatch):
    """Huge shard lists: ``max(MAX_DRY_SKIPS, 2 x shards)`` skipped in a row ends the search too."""
    monkeypatch.setattr(stream_guard, "MAX_DRY_SKIPS", 50)
    shards = [_blank_shard(tmp_path / f"{i}.tar", 200, prefix=f"h{i}") for i in range(2)]
    stream = LaionStream(shards, resolution=16, resampled=True)
    with within(30), pytest.raises(EmptyStreamError, match=r"50 samples skipped in a row and 0 of its 2 shards"):
        next(iter(stream))


def test_a_coupling_training_stream_without_usable_couplings_raises(tmp_path):
    """The coupling reader inherits the guard: shards whose samples have no x1 stop the training loader."""
    folder = tmp_path / "pairs"
    folder.mkdir()
    for i in range(2):
        _tar(folder / f"{i:05d}.tar", [(f"c{i}{k}.txt", b"a caption") for k in range(5)])
    loader = CouplingDataModule(train=str(folder), num_workers=0, batch_size=2).train_dataloader()
    with within(30), pytest.raises(EmptyStreamError, match=r"top reasons: missing_x1 \d+\)"):
        next(iter(loader))


# -- 2. 16-bit images and EXIF orientation -------------------------------------------------------------

def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _png48(rgb16: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (PIL cannot write one)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_a_16_bit_png_decodes_like_its_8_bit_version():
    g8 = np.arange(256, dtype=np.uint16).reshape(16, 16)  # every 8-bit level once
    low = np.random.default_rng(0).integers(-100, 101, g8.shape)  # the low byte must round, not matter
    g16 = Image.fromarray((g8 * 257 + low).clip(0, 65535).astype(np.uint16))
    assert Image.open(io.BytesIO(_png(g16))).mode == "I;16"
    ref = load_image(_png(Image.fromarray(g8.astype(np.uint8))), 16)
    x = load_image(_png(g16), 16)
    assert (x - ref).abs().max() <= 1 / 127.5 + 1e-6  # was white: 16-bit values clipped at 255
    assert x.min() == -1.0 and x.max() == 1.0
    # 48-bit RGB: PIL keeps the high byte of each channel, which is the 8-bit image
    rgb8 = np.stack([g8, g8[::-1], g8.T], -1).astype(np.uint8)
    x48 = load_image(_png48((rgb8.astype(np.int64) * 257 + 77).clip(max=65535)), 16)
    assert (x48 - load_image(_png(Image.fromarray(rgb8)), 16)).abs().max() <= 1 / 127.5 + 1e-6


def test_exif_orientation_is_applied_before_resizing():
    upright = np.zeros((32, 32, 3), np.uint8)
    upright[:16, :16], upright[:16, 16:] = (255, 0, 0), (0, 255, 0)   # top: red | green
    upright[16:, :16], upright[16:, 16:] = (0, 0, 255), (255, 255, 0)  # bottom: blue | yellow
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # a camera held sideways
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: turn 90 degrees clockwise to show
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    x = load_image(buf.getvalue(), 16)
    quadrants = [x[:, r:r + 8, c:c + 8].mean((1, 2)) for r in (0, 8) for c in (0, 8)]
    want = [torch.tensor(c, dtype=torch.float32) / 127.5 - 1 for c in upright[::16, ::16].reshape(4, 3)]
    for got, ref in zip(quadrants, want):
        assert (got - ref).abs().max() < 0.15, (got, ref)  # red top left, as shot; was rotated


# -- 3. only the JPEG, PNG and WebP decoders ever see shard bytes -----------------------------------------

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
       b"0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n")


def test_other_formats_named_like_images_are_counted_skips_and_never_decoded(tmp_path, monkeypatch):
    calls = []
    for plugin, cls in ((EpsImagePlugin, "EpsImageFile"), (TiffImagePlugin, "TiffImageFile")):
        original = getattr(plugin, cls)._open

        def spy(self, _original=original, _name=cls):
            calls.append(_name)
            return _original(self)

        monkeypatch.setattr(getattr(plugin, cls), "_open", spy)
    tiff = io.BytesIO()
    make_sample(0, 1)[0].save(tiff, format="TIFF")
    shard = _tar(tmp_path / "formats.tar", [
        ("eps.jpg", EPS), ("eps.txt", b"postscript under a jpg name"),
        ("tif.png", tiff.getvalue()), ("tif.txt", b"a tiff under a png name"),
        ("ok.jpg", _jpg(2)), ("ok.txt", b"a real jpeg"),
    ])
    stream = LaionStream(shard, resolution=16)
    keys = [s["key"] for s in stream]
    assert calls == []  # PIL's EPS (Ghostscript) and TIFF decoders were never even asked (were: both)
    assert keys == ["ok"] and stream.skips == Counter(bad_image=2)


# -- 4. crafted metadata ---------------------------------------------------------------------------------

def test_crafted_json_is_bad_metadata_not_a_crash(tmp_path, caplog):
    img = _jpg(3)
    rows = [("deep", b"[" * 200_000), ("huge", json.dumps({"pad": "x" * (1 << 20)}).encode()),
            ("list", b"[1, 2]"), ("good", b'{"punsafe": 0.0}')]
    members = []
    for key, meta in rows:
        members += [(f"{key}.jpg", img), (f"{key}.txt", f"caption of {key}".encode()), (f"{key}.json", meta)]
    shard = _tar(tmp_path / "meta.tar", members)
    kept = LaionStream(shard, resolution=16)
    samples = list(kept)  # the 200k "[" raised RecursionError out of the stream
    assert [s["key"] for s in samples] == ["deep", "huge", "list", "good"]
    assert [s["meta"] for s in samples] == [None, None, None, {"punsafe": 0.0}]
    assert kept.meta_dropped == 3 and kept.skips == Counter()
    assert "kept a sample without its metadata (bad_meta" in caplog.text and "nested too deeply" in caplog.text
    strict = LaionStream(shard, resolution=16, require_meta=True)
    assert [s["key"] for s in strict] == ["good"] and strict.skips == Counter(bad_meta=3)


def _worker_that_waits(grace: int) -> None:
    import time

    import data.laion as laion_module

    laion_module.SIGTERM_GRACE_S = grace
    laion_module.ignore_sigterm(0)
    while True:
        time.sleep(0.05)


def test_a_loader_worker_outlives_sigterm_by_its_grace_then_ends():
    """Job-wide SIGTERM must not kill a rank's loader workers mid-step, and a stuck worker must still end
    (at exit Python waits for daemonic children it sent SIGTERM: ignored outright, a raising rank never exits)."""
    import multiprocessing as mp
    import signal
    import time

    proc = mp.get_context("fork").Process(target=_worker_that_waits, args=(1,), daemon=True)
    proc.start()
    time.sleep(0.5)
    sent = time.monotonic()
    proc.terminate()  # SIGTERM, as the DataLoader's shutdown and a scheduler send it
    time.sleep(0.5)
    assert proc.is_alive()  # still serving batches while its rank reaches the step boundary
    proc.join(10)
    assert not proc.is_alive() and proc.exitcode == -signal.SIGALRM
    assert 0.9 < time.monotonic() - sent < 5
