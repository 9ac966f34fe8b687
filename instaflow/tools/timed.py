"""Run one stage's command and record its wall time, so the results table can report it.

    python -m instaflow.tools.timed runs/embedded/timings reflow -- python -m lightning_modules.cli fit ...

Writes ``<dir>/<stage>.json`` = {stage, command, start, end, wall_s, returncode} only when the
command succeeds; the exit status is passed through. A failed or killed attempt is kept in
``<dir>/.<stage>.attempts.json`` (one JSON line per attempt), and the record of the run that
finally succeeds (a resumed stage) adds them: ``wall_s`` is the total of all attempts, ``attempts``
lists the earlier ones. Both files are written atomically (``instaflow.state``); an attempt line
cut by an older, non-atomic write (or a full disk) is skipped and counted: the record says
``unreadable_attempts`` and the wrapper prints it, since that attempt's time is missing from the total.

A SIGTERM sent to this wrapper alone (``kill <pid>``, a container's PID 1) is
passed on to the command, so a training stage still saves its checkpoint before it exits; if the
wrapper is killed outright (kill -9), the kernel sends the command SIGTERM (Linux's parent-death
signal), so no stage trains on as an orphan.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from instaflow.state import atomic_write_json, read_json, read_jsonl, write_jsonl


def read_timings(dirpath: str | Path) -> dict[str, dict]:
    """``{stage: record}`` of every finished stage under ``dirpath`` (empty if none)."""
    d = Path(dirpath)
    # hidden files are not records: .<stage>.attempts.json holds a stage's unfinished attempts
    return {p.stem: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))
            if not p.name.startswith(".")} if d.is_dir() else {}


def write_record(out_dir: str | Path, stage: str, command: str, start: float, end: float,
                 attempts: list[dict] | None = None, unreadable: int = 0) -> dict:
    """Write ``<out_dir>/<stage>.json`` atomically (a finished stage's record, earlier attempts' time added);
    returns it."""
    wall = end - start + sum(float(a.get("wall_s", 0)) for a in attempts or [])
    rec = {"stage": stage, "command": command, "start": start, "end": end, "wall_s": round(wall, 1), "returncode": 0}
    if attempts:
        rec["attempts"] = attempts
    if unreadable:
        rec["unreadable_attempts"] = unreadable
    atomic_write_json(Path(out_dir) / f"{stage}.json", rec)
    return rec


def read_attempts(path: Path) -> tuple[list[dict], int]:
    """A stage's earlier attempts and how many were unreadable (JSON lines, or the older one-list format)."""
    old = read_json(path)
    records, bad = (old, 0) if isinstance(old, list) else read_jsonl(path)
    attempts = [a for a in records if isinstance(a, dict) and "wall_s" in a]
    bad += sum(int(a.get("unreadable", 0)) if isinstance(a, dict) else 1 for a in records
               if not (isinstance(a, dict) and "wall_s" in a))
    return attempts, bad


def record_attempt(path: Path, attempt: dict) -> None:
    """Add a failed attempt, atomically; unreadable earlier lines are kept as a count (``{"unreadable": n}``)."""
    attempts, bad = read_attempts(path)
    write_jsonl(path, attempts + ([{"unreadable": bad}] if bad else []) + [attempt])


def _sigterm_when_parent_dies() -> None:
    """In the child, before exec: if this wrapper dies (even by kill -9), the kernel sends the stage SIGTERM, so
    it saves a checkpoint and stops instead of training on as an orphan (Linux; elsewhere nothing)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 4 or argv[2] != "--":
        print("usage: python -m instaflow.tools.timed DIR STAGE -- COMMAND...", file=sys.stderr)
        return 2
    out_dir, stage, cmd = Path(argv[0]), argv[1], argv[3:]
    start = time.time()
    proc = subprocess.Popen(cmd, preexec_fn=_sigterm_when_parent_dies)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        rc = proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    end = time.time()
    attempts_file = out_dir / f".{stage}.attempts.json"
    if rc != 0:  # killed or failed: its time still counts once the stage is finished (resumed)
        record_attempt(attempts_file, {"start": start, "end": end, "wall_s": round(end - start, 1), "returncode": rc})
        return rc
    attempts, unreadable = read_attempts(attempts_file)
    rec = write_record(out_dir, stage, " ".join(cmd), start, end, attempts, unreadable)
    attempts_file.unlink(missing_ok=True)
    print(f"[timed] {stage}: {rec['wall_s']:.1f} s{_earlier(len(attempts), unreadable)}", flush=True)
    return rc


def _earlier(n: int, unreadable: int) -> str:
    """What the printed total includes: `` (2 earlier attempts included; 1 ... unreadable ...)``, or empty."""
    parts = [f"{n} earlier attempt{'s' if n != 1 else ''} included"] if n else []
    if unreadable:
        parts.append(f"{unreadable} earlier attempt record{'s' if unreadable != 1 else ''} unreadable (cut), "
                     "its time missing from the total")
    return f" ({'; '.join(parts)})" if parts else ""


if __name__ == "__main__":
    sys.exit(main())
