"""instaflow.resume.marks: what a run writes beside its checkpoints (finished, running, the run each checkpoint
stores), and which running mark names a live process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from instaflow.resume import marks


def test_a_fit_is_marked_running_then_finished_or_stopped(tmp_path):
    """start: no finished mark, a running mark naming this process; stop: no running mark; end: finished at its step."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / marks.FINISHED).write_text("{}")  # an earlier fit of the same folder ended; this one is new
    marks.mark_running([a, b])
    for d in (a, b):
        assert not (d / marks.FINISHED).exists()
        mark = json.loads((d / marks.RUNNING).read_text())
        assert mark["pid"] == os.getpid() and marks.mark_alive(mark) and mark["time"] > 0
    assert marks.unfinished([a, b], [a / "last.ckpt"]) and not marks.unfinished([a, b], [])
    marks.clear_running([a, b])
    assert not (a / marks.RUNNING).exists() and not (b / marks.RUNNING).exists()
    marks.clear_running([a])  # twice (an exception after the end): nothing to remove, no error
    marks.mark_finished([a, b], 12)
    assert json.loads((b / marks.FINISHED).read_text())["step"] == 12
    assert not marks.unfinished([a, b], [a / "last.ckpt"])


def test_a_checkpoint_names_its_run_and_a_moved_run_is_still_the_same(tmp_path):
    run = tmp_path / "reflow" / "version_3"
    state = marks.run_state(run)
    assert state == {"run": str(run.resolve())} and marks.run_state(None) == {"run": None}
    meta = {"callbacks": {marks.RUN_STATE_KEY: state}}
    assert marks.checkpoint_owner(meta) == str(run.resolve()) and marks.checkpoint_owner({}) is None
    assert marks.same_run(run, tmp_path / "moved" / "reflow" / "version_3")  # the folder moved whole
    assert not marks.same_run(run, tmp_path / "reflow" / "version_4")


def test_running_mark_names_this_process_and_only_a_matching_live_process_is_alive():
    mine = marks.running_mark()
    assert mine["pid"] == os.getpid() and mine["start_ticks"] > 0 and len(mine["boot_id"]) == 36
    assert marks.mark_alive(mine)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = marks.running_mark(other.pid)
        assert marks.mark_alive(live)
        assert not marks.mark_alive({**live, "boot_id": "0" * 36})  # the same pid in another boot: another process
        assert not marks.mark_alive({**live, "start_ticks": live["start_ticks"] - 1})  # the pid reused
        assert not marks.mark_alive({**live, "host": "elsewhere"})
        assert not marks.mark_alive({"host": live["host"], "pid": other.pid, "start": 0})  # an old pid-only mark
    finally:
        other.kill()
        other.wait()
    assert not marks.mark_alive(live)
