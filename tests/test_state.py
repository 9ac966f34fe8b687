"""instaflow.state: atomic files and folders, and readers that survive what a kill left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from instaflow import state


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "a.json"
    state.atomic_write_json(p, {"x": 1})
    state.atomic_write_json(p, {"x": 2})
    assert json.loads(p.read_text()) == {"x": 2}
    assert [q.name for q in tmp_path.iterdir()] == ["a.json"]


def test_an_error_while_writing_keeps_the_old_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with state.atomic_file(p, "w") as f:
            f.write("half")
            raise RuntimeError("killed")
    assert p.read_text() == "old"
    assert [q.name for q in tmp_path.iterdir()] == ["a.txt"]


def test_a_planted_symlink_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    link = tmp_path / "out.txt"
    link.symlink_to(victim)
    state.atomic_write_text(link, "new")
    assert victim.read_text() == "precious"
    assert not link.is_symlink() and link.read_text() == "new"


def test_a_kill_during_a_write_leaves_the_previous_file(tmp_path):
    """A real kill -9 while a large file is being written: the target holds the old bytes, never a prefix."""
    p = tmp_path / "big.bin"
    p.write_bytes(b"old")
    code = textwrap.dedent(f"""
        import sys, time
        from instaflow import state
        with state.atomic_file({str(p)!r}, "wb") as f:
            f.write(b"x" * 1_000_000)
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert p.read_bytes() == b"old"


def test_read_jsonl_skips_and_counts_a_cut_last_line(tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert state.read_jsonl(p) == ([{"step": 1}, {"step": 2}], 1)
    assert state.append_jsonl(p, {"step": 3}) == 1
    assert state.read_jsonl(p) == ([{"step": 1}, {"step": 2}, {"step": 3}], 0)
    assert state.read_jsonl(tmp_path / "absent.jsonl") == ([], 0)
    assert state.read_json(tmp_path / "absent.json", "d") == "d"
    (tmp_path / "cut.json").write_text('{"a": [1, 2')
    assert state.read_json(tmp_path / "cut.json", "d") == "d"


def test_atomic_folder_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    out = tmp_path / "model"
    with state.atomic_folder(out) as tmp:
        (tmp / "model_index.json").write_text("1")
    assert (out / "model_index.json").read_text() == "1"
    with pytest.raises(RuntimeError):
        with state.atomic_folder(out) as tmp:
            (tmp / "model_index.json").write_text("2")
            raise RuntimeError("export failed half way")
    assert (out / "model_index.json").read_text() == "1"  # the complete old folder, untouched
    with state.atomic_folder(out) as tmp:
        (tmp / "model_index.json").write_text("3")
    assert (out / "model_index.json").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_recover_folder_puts_back_a_folder_left_aside_by_a_kill_between_the_renames(tmp_path):
    out = tmp_path / "ckpt"
    aside = tmp_path / f".ckpt{state.OLD_MARK}999999-abcd"
    aside.mkdir()
    (aside / "meta.pt").write_text("complete")
    leftover = tmp_path / f".ckpt{state.TMP_MARK}999999-ef01"
    leftover.mkdir()
    assert state.recover_folder(out) == aside
    assert (out / "meta.pt").read_text() == "complete"
    assert not leftover.exists()


def test_atomic_write_is_fast_enough_to_use_everywhere(tmp_path):
    t0 = time.perf_counter()
    for i in range(50):
        state.atomic_write_json(tmp_path / "r.json", {"i": i})
    assert json.loads((tmp_path / "r.json").read_text()) == {"i": 49}
    assert os.listdir(tmp_path) == ["r.json"]
    assert time.perf_counter() - t0 < 30
