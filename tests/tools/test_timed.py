"""instaflow.tools.timed: its attempts file survives a cut write; a finished stage still records and exits 0."""

from __future__ import annotations

import json
import sys

from instaflow.tools import timed


def test_a_cut_attempts_file_still_lets_the_finished_stage_record_and_counts_the_cut_attempt(tmp_path, capsys):
    """A kill during an older in-place write cut the last line: the stage finishing now exits 0, its record keeps
    the readable attempt's time and says one attempt record was unreadable (its time is missing)."""
    (tmp_path / ".reflow.attempts.json").write_text(
        '{"start": 1.0, "end": 3.0, "wall_s": 2.0, "returncode": 143}\n{"start": 5.0, "end": 7.')
    assert timed.main([str(tmp_path), "reflow", "--", sys.executable, "-c", "pass"]) == 0
    rec = json.loads((tmp_path / "reflow.json").read_text())
    assert [a["returncode"] for a in rec["attempts"]] == [143] and rec["unreadable_attempts"] == 1
    assert rec["wall_s"] >= 2.0 and not (tmp_path / ".reflow.attempts.json").exists()
    assert "1 earlier attempt included; 1 earlier attempt record unreadable (cut)" in capsys.readouterr().out


def test_failed_attempts_are_kept_as_lines_and_a_cut_one_stays_counted(tmp_path):
    attempts = tmp_path / ".eval.attempts.json"
    attempts.write_text('[{"start": 1.0, "end": 2.0, "wall_s": 1.0, "returncode": 1}]')  # the older one-list format
    fail = [sys.executable, "-c", "import sys; sys.exit(3)"]
    assert timed.main([str(tmp_path), "eval", "--", *fail]) == 3
    with attempts.open("a") as f:
        f.write('{"start": 9.0, "en')  # cut
    assert timed.main([str(tmp_path), "eval", "--", *fail]) == 3
    assert timed.read_attempts(attempts)[1] == 1  # the cut line is kept as a count through the rewrite
    assert [a["returncode"] for a in timed.read_attempts(attempts)[0]] == [1, 3, 3]
    assert timed.main([str(tmp_path), "eval", "--", sys.executable, "-c", "pass"]) == 0
    rec = json.loads((tmp_path / "eval.json").read_text())
    assert len(rec["attempts"]) == 3 and rec["unreadable_attempts"] == 1
