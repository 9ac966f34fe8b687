"""Run one stage's command and record its wall time, so the results table can report it.

    python -m instaflow.tools.timed runs/embedded/timings reflow -- python -m lightning_modules.cli fit ...

Writes ``<dir>/<stage>.json`` = {stage, command, start, end, wall_s, returncode} only when the
command succeeds; the exit status is passed through. A failed or killed attempt is kept in
``<dir>/.<stage>.attempts.json``, and the record of the run that finally succeeds (a resumed
stage) adds them: ``wall_s`` is the total of all attempts, ``attempts`` lists the earlier ones.

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


def read_timings(dirpath: str | Path) -> dict[str, dict]:
    """``{stage: record}`` of every finished stage under ``dirpath`` (empty if none)."""
    d = Path(dirpath)
    # hidden files are not records: .<stage>.attempts.json holds a stage's unfinished attempts
    return {p.stem: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))
            if not p.name.startswith(".")} if d.is_dir() else {}


def write_record(out_dir: str | Path, stage: str, command: str, start: float, end: float,
                 attempts: list[dict] | None = None) -> dict:
    """Write ``<out_dir>/<stage>.json`` atomically (a finished stage's record, earlier attempts' time added);
    returns it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wall = end - start + sum(a["wall_s"] for a in attempts or [])
    rec = {"stage": stage, "command": command, "start": start, "end": end, "wall_s": round(wall, 1), "returncode": 0}
    if attempts:
        rec["attempts"] = attempts
    tmp = out_dir / f".{stage}.json.tmp"
    tmp.write_text(json.dumps(rec, indent=2))
    tmp.replace(out_dir / f"{stage}.json")
    return rec


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
    attempts = json.loads(attempts_file.read_text()) if attempts_file.is_file() else []
    if rc != 0:  # killed or failed: its time still counts once the stage is finished (resumed)
        out_dir.mkdir(parents=True, exist_ok=True)
        attempts.append({"start": start, "end": end, "wall_s": round(end - start, 1), "returncode": rc})
        attempts_file.write_text(json.dumps(attempts, indent=2))
        return rc
    rec = write_record(out_dir, stage, " ".join(cmd), start, end, attempts)
    attempts_file.unlink(missing_ok=True)
    extra = f" ({len(attempts)} earlier attempt{'s' if len(attempts) > 1 else ''} included)" if attempts else ""
    print(f"[timed] {stage}: {rec['wall_s']:.1f} s{extra}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
