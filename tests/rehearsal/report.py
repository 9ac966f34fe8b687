"""One line per rehearsal scenario: what was injected, what it must end in, what it ended in, in how many seconds.

Each scenario test wraps its work in ``scenario(name, expected, bound_s)``. The context times the work,
records the outcome (``as expected`` or the first line of the failure) in ``REPORT`` (JSON lines, one file
per pytest session, written atomically line by line), and fails the test when the work took longer than its
bound. ``tests/rehearsal/conftest.py`` prints the table at the end of the session (``make rehearsal``).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

REPORT = Path(os.environ.get("REHEARSAL_REPORT", Path(__file__).resolve().parents[2] / "runs" / "rehearsal" /
                             "report.jsonl"))


def record(row: dict) -> None:
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    with open(REPORT, "a", encoding="utf-8") as f:  # one short line per write: O_APPEND keeps lines whole
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_report() -> list[dict]:
    if not REPORT.exists():
        return []
    rows = []
    for line in REPORT.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a killed session
    return rows


@contextmanager
def scenario(name: str, expected: str, bound_s: float, family: str = "sd"):
    """Time the block, record its outcome, and fail when it ran past ``bound_s`` seconds."""
    start = time.monotonic()
    outcome = "as expected"
    try:
        yield
    except BaseException as exn:
        outcome = f"FAILED: {type(exn).__name__}: {str(exn).strip().splitlines()[0][:200] if str(exn).strip() else ''}"
        raise
    finally:
        seconds = time.monotonic() - start
        if outcome == "as expected" and seconds > bound_s:
            outcome = f"FAILED: took {seconds:.0f} s, bound {bound_s:.0f} s"
        record({"scenario": name, "family": family, "expected": expected, "outcome": outcome,
                "seconds": round(seconds, 1), "bound_s": bound_s})
    assert seconds <= bound_s, f"scenario {name!r} took {seconds:.0f} s, over its bound of {bound_s:.0f} s"


def table(rows: list[dict]) -> str:
    """The report: one line per scenario (the last record of each name)."""
    last = {r["scenario"]: r for r in rows}
    lines = [f"{'scenario':<34} {'family':<6} {'seconds':>8} {'bound':>6}  outcome (expected: ...)"]
    for r in last.values():
        lines.append(f"{r['scenario']:<34} {r['family']:<6} {r['seconds']:>8.1f} {r['bound_s']:>6.0f}  "
                     f"{r['outcome']} (expected: {r['expected']})")
    return "\n".join(lines)
