"""Run one stage's command and record its wall time, so the results table can report it.

    python -m instaflow.tools.timed runs/embedded/timings reflow -- python -m lightning_modules.cli fit ...

Writes ``<dir>/<stage>.json`` = {stage, command, start, end, wall_s, returncode} only when the
command succeeds (a failed stage leaves no record, so a rerun is timed afresh); the exit status
is passed through. A SIGTERM sent to this wrapper alone (``kill <pid>``, a container's PID 1) is
passed on to the command, so a training stage still saves its checkpoint before it exits.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path


def read_timings(dirpath: str | Path) -> dict[str, dict]:
    """``{stage: record}`` of every finished stage under ``dirpath`` (empty if none)."""
    d = Path(dirpath)
    return {p.stem: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))} if d.is_dir() else {}


def write_record(out_dir: str | Path, stage: str, command: str, start: float, end: float) -> dict:
    """Write ``<out_dir>/<stage>.json`` atomically (a finished stage's record); returns it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rec = {"stage": stage, "command": command, "start": start, "end": end, "wall_s": round(end - start, 1), "returncode": 0}
    tmp = out_dir / f".{stage}.json.tmp"
    tmp.write_text(json.dumps(rec, indent=2))
    tmp.replace(out_dir / f"{stage}.json")
    return rec


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 4 or argv[2] != "--":
        print("usage: python -m instaflow.tools.timed DIR STAGE -- COMMAND...", file=sys.stderr)
        return 2
    out_dir, stage, cmd = Path(argv[0]), argv[1], argv[3:]
    start = time.time()
    proc = subprocess.Popen(cmd)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        rc = proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    end = time.time()
    if rc == 0:
        write_record(out_dir, stage, " ".join(cmd), start, end)
        print(f"[timed] {stage}: {end - start:.1f} s", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
