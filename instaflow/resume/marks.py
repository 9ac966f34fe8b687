"""What a run writes beside its checkpoints so the next launch knows what it is: the finished and running marks,
and the run folder each checkpoint stores.

- ``FINISHED`` (``fit_finished.json``: step, time): the fit ended normally; running the command again
  starts a new run instead of "resuming" a finished one.
- ``RUNNING`` (``fit_running.json``: ``running_mark`` + time): which process trains into the folder
  now: host, pid, process start time and boot id, so a reused pid after a reboot or container
  restart is not mistaken for it (``mark_alive``).
- ``RUN_STATE_KEY``: the state under which each checkpoint stores ``{"run": <run folder>}``
  (``callbacks.resume.Resume``), so resume never takes another run's checkpoint from a shared ``dirpath``.

The marks are written atomically (``instaflow.state``): a kill leaves the old mark or the new one.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from instaflow.state import atomic_write_json

FINISHED = "fit_finished.json"
RUNNING = "fit_running.json"  # running_mark(): host, pid, process start time, boot id
RUN_STATE_KEY = "Resume"  # callbacks.resume.Resume's state in each checkpoint: {"run": the run folder writing it}


def mark_running(dirs: list[Path]) -> None:
    """A fit started or resumed in ``dirs``: unfinished, and trained by this process, until it stops."""
    for d in dirs:
        (d / FINISHED).unlink(missing_ok=True)
        atomic_write_json(d / RUNNING, {**running_mark(), "time": time.time()})


def clear_running(dirs: list[Path]) -> None:
    """The fit in ``dirs`` stopped (ended, failed or killed by SIGTERM): no process trains into them now."""
    for d in dirs:
        (d / RUNNING).unlink(missing_ok=True)


def mark_finished(dirs: list[Path], step: int) -> None:
    """The fit in ``dirs`` ended normally at ``step``: its checkpoints are not continued again."""
    for d in dirs:
        atomic_write_json(d / FINISHED, {"step": step, "time": time.time()})


def unfinished(dirs: list[Path], checkpoints: list[Path]) -> bool:
    """Whether a run with checkpoint folders ``dirs`` holding ``checkpoints`` can be continued (no finished mark)."""
    return bool(checkpoints) and not any((d / FINISHED).exists() for d in dirs)


def run_state(run_dir: str | Path | None) -> dict:
    """What each checkpoint stores under ``RUN_STATE_KEY``: the run folder writing it."""
    return {"run": None if run_dir is None else str(Path(run_dir).resolve())}


def checkpoint_owner(meta: dict) -> str | None:
    """The run folder a checkpoint's dict says wrote it (None: an older checkpoint, or one without ``Resume``)."""
    return ((meta.get("callbacks") or {}).get(RUN_STATE_KEY) or {}).get("run")


def same_run(a: str | Path, b: str | Path) -> bool:
    """Whether two run folders are one run: equal paths, or equal ``<name>/<version>`` (a run folder moved whole)."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a.parts[-2:] == b.parts[-2:]


# -- the running mark: which process trains into a folder ----------------------------------------------

def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def boot_id() -> str | None:
    """This boot of this machine (Linux), None elsewhere: a pid from another boot is another process."""
    return _read("/proc/sys/kernel/random/boot_id")


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field 22); None if gone."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    try:
        return int(stat[stat.rindex(")") + 2:].split()[19])  # fields after "(comm)" start at field 3
    except (ValueError, IndexError):
        return None


def running_mark(pid: int | None = None) -> dict:
    """What identifies process ``pid`` (default: this one) on this machine, across pid reuse and reboots."""
    pid = os.getpid() if pid is None else pid
    return {"host": socket.gethostname(), "pid": pid, "start_ticks": process_start(pid), "boot_id": boot_id()}


def mark_alive(mark: dict) -> bool:
    """Whether the process a ``running_mark`` names is alive now: same host, same boot, same pid *and* start time.

    A mark from another machine cannot be checked (False: a requeued job's process is gone); one
    without a start time or boot id (older marks, non-Linux) counts as stale.
    """
    try:
        host, pid, start, boot = mark["host"], int(mark["pid"]), mark.get("start_ticks"), mark.get("boot_id")
    except (KeyError, TypeError, ValueError):
        return False
    if host != socket.gethostname() or start is None or boot is None or boot != boot_id():
        return False
    return process_start(pid) == start
