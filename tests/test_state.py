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


def test_stale_temporaries_of_dead_writers_here_are_removed_others_kept(tmp_path):
    """Temporary names carry host and pid: a dead writer's leftovers on this machine go, a live writer's and
    another machine's (a filesystem shared by nodes, whose pids mean nothing here) stay."""
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        here = state._host()
        names = {"dead_file": f".00001.tar{state.TMP_MARK}{here}-{dead}-aaaa0000",
                 "live_file": f".00002.tar{state.TMP_MARK}{here}-{live.pid}-bbbb0000",
                 "other_host": f".00003.tar{state.TMP_MARK}some-other-node.{socket.gethostname()}x-{dead}-cccc0000",
                 "old_form": f".00004.tar{state.TMP_MARK}{dead}-dddd0000"}
        for key, name in names.items():
            (tmp_path / name).write_text(key)
        (tmp_path / f".ckpt{state.TMP_MARK}{here}-{dead}-eeee0000").mkdir()
        (tmp_path / "00001.tar").write_text("complete")
        assert state.remove_stale_temporaries(tmp_path) == 3
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted(["00001.tar", names["live_file"], names["other_host"]])
    finally:
        live.kill()
        live.wait()
    assert state.sibling(tmp_path / "x.tar").name.startswith(f".x.tar{state.TMP_MARK}{state._host()}-")
