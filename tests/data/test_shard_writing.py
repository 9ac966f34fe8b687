"""Shard writing at scale (issue 24): no planted symlink is followed, two writers of one shard never mix,
a real kill -9 leaves the previous complete shard (or none), the data is fsynced; the shapes world's
completion marks are atomic and a cut one means redo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from data import shapes
from data.shards import write_tar
from tests.conftest import ROOT

WRITER = """
import sys, time
from pathlib import Path
from data.shards import write_tar
out, tag, ready, go = sys.argv[1:5]
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.01)

def members():
    for i in range(40):
        if i == 5:
            Path(ready + ".midway").touch()
        time.sleep(0.02)  # slow enough that two writers overlap and a kill lands mid-write
        yield f"{i:04d}.txt", (tag * 4000).encode()

write_tar(out, members())
"""


def _members(tag: str, n: int = 40) -> list[tuple[str, bytes]]:
    return [(f"{i:04d}.txt", (tag * 4000).encode()) for i in range(n)]


def _read(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _start(tmp_path: Path, out: Path, tag: str) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    ready = tmp_path / f"ready_{tag}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), str(out), tag, str(ready), str(tmp_path / "go")],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    return proc, ready


def _wait_for(*paths: Path, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert time.monotonic() < end, f"never appeared: {[str(p) for p in paths if not p.exists()]}"
        time.sleep(0.02)


@pytest.mark.parametrize("planted", ["NAME.tmp", "NAME"])
def test_a_planted_symlink_is_never_followed(tmp_path, planted):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "shards" / "00000.tar"
    out.parent.mkdir()
    link = out.with_name(out.name + ".tmp") if planted == "NAME.tmp" else out
    link.symlink_to(victim)
    write_tar(out, _members("a", 3))
    assert victim.read_text() == "precious"  # was overwritten with the tar through NAME.tmp
    assert not out.is_symlink() and _read(out) == _members("a", 3)
    assert not out.with_name(out.name + ".tmp").exists()  # nor is a leftover NAME.tmp kept


def test_the_shard_is_fsynced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_tar(tmp_path / "00000.tar", _members("a", 2))
    assert any(Path(p).name.startswith(".00000.tar.tmp-") for p in synced), synced  # the data, never synced before
    assert str(tmp_path) in synced  # and the folder's new entry


def test_two_writers_of_one_shard_leave_one_complete_shard(tmp_path):
    out = tmp_path / "00000.tar"
    (a, ready_a), (b, ready_b) = _start(tmp_path, out, "a"), _start(tmp_path, out, "b")
    _wait_for(ready_a, ready_b)
    (tmp_path / "go").touch()  # both write at once
    errors = [p.communicate(timeout=120)[1] for p in (a, b)]
    assert [a.returncode, b.returncode] == [0, 0], errors  # was: the second rename found NAME.tmp gone
    assert _read(out) in (_members("a"), _members("b"))  # whole, and one writer's (was: a mix of both)


@pytest.mark.parametrize("previous", [True, False])
def test_a_kill_mid_write_leaves_the_previous_shard_or_none(tmp_path, previous):
    out = tmp_path / "shards" / "00000.tar"
    out.parent.mkdir()
    if previous:
        write_tar(out, _members("old", 3))
    before = out.read_bytes() if previous else None
    proc, ready = _start(tmp_path, out, "new")
    _wait_for(ready)
    (tmp_path / "go").touch()
    _wait_for(Path(str(ready) + ".midway"))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    if previous:
        assert out.read_bytes() == before and _read(out) == _members("old", 3)
    else:
        assert not out.exists()
    # what the kill left is a hidden temporary file, which no reader's *.tar pattern picks up
    assert sorted(p.name for p in out.parent.glob("*.tar")) == (["00000.tar"] if previous else [])
    assert all(p.name.startswith(".00000.tar.tmp-") for p in out.parent.iterdir() if p != out)


def test_a_cut_completion_mark_of_the_shapes_world_means_redo(tmp_path):
    paths = shapes.write_split(tmp_path, "val", 8, samples_per_shard=4, progress=False)
    stats = paths[1].with_name("00001_stats.json")
    whole = stats.read_text()
    stats.write_text(whole[: len(whole) // 2])  # a kill in the middle of an older, non-atomic write
    paths[1].write_bytes(paths[1].read_bytes()[:1000])  # and its shard with it
    kept = paths[0].stat().st_mtime_ns
    assert not shapes.shard_complete(paths[1], 1) and shapes.shard_complete(paths[0], 0)
    shapes.write_split(tmp_path, "val", 8, samples_per_shard=4, progress=False)
    assert paths[0].stat().st_mtime_ns == kept  # a complete shard is kept
    assert len(_read(paths[1])) == 3 * 4 and json.loads(stats.read_text())["count"] == 4  # was: taken as complete
    assert sorted(p.name for p in paths[1].parent.iterdir()) == ["00000.tar", "00000_stats.json", "00001.tar",
                                                                  "00001_stats.json"]
