"""The coupling writer's completion marks: written atomically, and a cut or orphaned mark means redo."""

from __future__ import annotations

import json

from callbacks.pair_writer import CouplingWriter


def test_a_shard_is_done_only_with_its_tar_and_a_readable_mark(tmp_path):
    w = CouplingWriter(str(tmp_path))
    url = "/data/in/00003.tar"
    assert not w.is_done(url)
    (tmp_path / "00003_stats.json").write_text(json.dumps({"count": 2, "keys": ["a", "b"]})[:9])  # cut by a kill
    (tmp_path / "00003.tar").write_bytes(b"\0" * 1024)
    assert not w.is_done(url)  # before: the mark's existence alone said "done", so a cut mark lost the shard
    (tmp_path / "00003_stats.json").write_text(json.dumps({"count": 2, "keys": ["a", "b"]}))
    assert w.is_done(url)
    (tmp_path / "00003.tar").unlink()
    assert not w.is_done(url)  # a mark without its shard


def test_marks_never_follow_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "pairs"
    out.mkdir()
    (out / "manifest_rank0.json.tmp").symlink_to(victim)  # the old fixed temporary name
    w = CouplingWriter(str(out))

    class Trainer:
        loggers, is_global_zero = [], False

    w._bar = type("Bar", (), {"close": lambda self: None})()
    w._t0, w._n, w._skips, w._skipped_done = 0.0, 0, 0, 0
    w.on_predict_end(Trainer(), None)
    assert victim.read_text() == "precious"
    assert json.loads((out / "manifest_rank0.json").read_text())["count"] == 0
