"""What the resume protocol refuses: a checkpoint holding NaN/inf (never written, never resumed from), and a
second process training into a run folder whose process is still alive on this machine.

``first_non_finite`` finds a NaN/inf tensor among a checkpoint's weights and EMA shadows; every rank
checks its own part before any rank writes (``refuse_non_finite_on_every_rank``), so one bad tensor
on any rank (a shard) stops the fit on every rank, naming it, and the last good checkpoint stays the
newest. ``refuse_if_alive`` reads the running mark (``instaflow.resume.marks``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import torch

from instaflow.collective import every_rank_raises
from instaflow.resume.checkpoints import load_file, validate_folder
from instaflow.resume.marks import mark_alive
from instaflow.state import read_json


class NonFiniteCheckpoint(ValueError):
    """A checkpoint whose weights or EMA hold NaN/inf: never written, never resumed from."""


def _tensors(obj: Any, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every floating tensor in nested dicts/lists (DTensors as their local shard)."""
    if isinstance(obj, torch.Tensor):
        t = obj.to_local() if hasattr(obj, "to_local") else obj
        if (t.is_floating_point() or t.is_complex()) and t.device.type != "meta":
            yield name, t
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{name}[{k!r}]" if name else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{name}[{i}]")


def first_non_finite(checkpoint: dict) -> str | None:
    """The name of the first weight (``state_dict``) or EMA shadow tensor (a callback state's ``shadow``) holding
    NaN/inf, or None. Other callback states may be infinite by design (``ModelCheckpoint``'s ``kth_value``).

    One ``isfinite`` pass over the tensors, one device sync per device (cost: reading them once).
    """
    named = list(_tensors(checkpoint.get("state_dict") or {}, ""))
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if isinstance(state, dict) and "shadow" in state:
            named += list(_tensors(state["shadow"], f"callbacks[{key!r}]['shadow']"))
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append(i)
    bad: list[int] = []
    for idx in by_device.values():
        ok = torch.stack([torch.isfinite(named[i][1]).all() for i in idx]).cpu()
        bad += [i for i, good in zip(idx, ok.tolist()) if not good]
    return named[min(bad)][0] if bad else None


def non_finite_message(checkpoint: dict, where: str) -> str | None:
    """Why ``checkpoint`` must not be written to (or resumed from) ``where``, or None when it is finite."""
    name = first_non_finite(checkpoint)
    if name is None:
        return None
    return (f"the checkpoint of step {checkpoint.get('global_step', '?')} ({where}) holds NaN/inf in {name}: not "
            "written, so the last good checkpoint stays the newest; the training diverged (lower the learning "
            "rate, check the data, or resume from the last good checkpoint)")


def refuse_non_finite(checkpoint: dict, where: str) -> None:
    """Raise ``NonFiniteCheckpoint`` naming the first NaN/inf tensor and the step instead of writing it."""
    msg = non_finite_message(checkpoint, where)
    if msg is not None:
        raise NonFiniteCheckpoint(msg)


def refuse_non_finite_on_every_rank(checkpoint: dict, where: str, what: str) -> None:
    """``refuse_non_finite`` on every rank before any write: a rank-0-only refusal would leave the others waiting
    in the next collective; ``what`` names the check in the error the other ranks raise."""
    with every_rank_raises(what):
        refuse_non_finite(checkpoint, where)


def non_finite_file(path: Path) -> str | None:
    """Why a checkpoint on disk holds NaN/inf (file: every tensor read once, memory-mapped; folder: ``meta.pt``'s
    tensors, the EMA), or None."""
    ckpt = validate_folder(path) if path.is_dir() else load_file(path, mmap=True)
    name = first_non_finite(ckpt)
    return None if name is None else f"{path} holds NaN/inf in {name}"


# -- another live run --------------------------------------------------------------------------------------

def global_rank_zero() -> bool:
    """Whether this process is global rank 0 of its launch (RANK, SLURM_PROCID and LOCAL_RANK unset or 0)."""
    return all(int(os.environ.get(k) or 0) == 0 for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK"))


def refuse_if_alive(running: Path) -> None:
    """Stop when the process that trains into this folder is still alive on this machine (left by a killed
    parent, or launched twice): two runs must not write one folder.

    Alive means same host, boot, pid and process start time (``mark_alive``): a reused pid after a
    reboot or in a restarted container is a stale mark. Only global rank 0 refuses; the other ranks
    follow it (they never see a mark of their own run, which rank 0 writes once all ranks started).
    """
    mark = read_json(running)
    if not isinstance(mark, dict) or not global_rank_zero() or not mark_alive(mark):
        return
    pid = mark["pid"]
    if pid == os.getpid():
        return  # this process ran a fit before in the same interpreter (an earlier in-process fit)
    raise SystemExit(f"[resume] {running.parent} is being trained by process {pid} on this machine right now "
                     f"({running}): stop it (kill -TERM {pid} saves a checkpoint) and run again, or pass "
                     "--resume.auto false to start a separate run")
