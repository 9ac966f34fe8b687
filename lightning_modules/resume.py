"""Find a fit's own unfinished checkpoint, so running the same command again continues it.

A run is the fit's logger version folder (``<save_dir>/<name>/version_<n>``, where LightningCLI
saves ``config.yaml`` and ``ModelCheckpoint`` its ``checkpoints/``; an explicit checkpoint
``dirpath`` is used instead when the config sets one). The newest run whose saved config equals
this one's is looked at, and continued when it has a ``last.ckpt`` and no ``fit_finished.json``
(``callbacks.resume.Resume``): the CLI passes ``ckpt_path`` and the run's version, so the curves,
checkpoints and export go on in the same folder. Lightning restores step, optimizer, LR scheduler
and callback states (EMA) from the checkpoint.

"Equal" ignores what says where or how a run is launched, not what it trains: ``ckpt_path``, the
logger's ``version`` and ``purge_step`` (the CLI sets both on resume; TensorBoard then hides what
the stopped run logged after its checkpoint), ``trainer.default_root_dir`` (the SLURM launcher
keys it by job id) and ``trainer.plugins``; anything else (another learning rate, more steps) is a
different run and starts afresh, with a message naming the checkpoint and the differing keys.

Under SLURM a requeued job also has Lightning's ``hpc_ckpt_<n>.ckpt`` (saved on the requeue
signal) in ``default_root_dir``: the newer of it and ``last.ckpt`` is used.
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from instaflow.models.checkpoints import FINISHED, RUNNING, checkpoint_step

LAST = "last.ckpt"
# launch-only keys: a requeued or resubmitted run of the same experiment may differ in these
IGNORED = ("ckpt_path", "trainer.logger.init_args.version", "trainer.logger.init_args.purge_step",
           "trainer.default_root_dir", "trainer.plugins")
VERSIONED_LOGGERS = ("TensorBoardLogger", "CSVLogger")


@dataclass
class Found:
    """What to continue: the checkpoint, its step, and the logger version to log into (None: no versioned logger)."""

    ckpt: Path
    step: int
    version: str | None
    run_dir: Path


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.0.c": value}``; None values dropped (a dump may leave unset keys out or write them as null)."""
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else None
    if items is None:
        return {} if d is None else {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(_flat(v, f"{prefix}{k}."))
    return out or {prefix[:-1]: type(d)()}


def config_differences(saved: dict, current: dict) -> list[str]:
    """Keys (dotted) whose values differ between two fit configs, launch-only keys ignored."""
    a, b = _flat(saved), _flat(current)
    return sorted(k for k in set(a) | set(b)
                  if a.get(k) != b.get(k) and not any(k == i or k.startswith(i + ".") for i in IGNORED))


def _checkpoint_dirs(cfg: dict) -> list[Path]:
    """Explicit ``dirpath`` of the config's ``ModelCheckpoint(save_last=...)`` callbacks."""
    out = []
    for cb in cfg.get("trainer", {}).get("callbacks") or []:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("ModelCheckpoint"):
            args = cb.get("init_args") or {}
            if args.get("save_last") and args.get("dirpath"):
                out.append(Path(args["dirpath"]))
    return out


def _runs(cfg: dict) -> tuple[list[tuple[Path, str | None]], str]:
    """Candidate run folders, newest first, with their version names; and why there are none, if so."""
    trainer = cfg.get("trainer", {})
    logger = trainer.get("logger")
    root = Path(trainer.get("default_root_dir") or ".")
    if logger is True or logger is None:  # Lightning's default logger: its version cannot be set from here
        return [], ("the trainer uses Lightning's default logger; give trainer.logger (a TensorBoardLogger with "
                    "save_dir and name, as experiments/base/default.yaml does) to make runs resumable")
    if isinstance(logger, dict) and str(logger.get("class_path", "")).rsplit(".", 1)[-1] in VERSIONED_LOGGERS:
        args = logger.get("init_args") or {}
        save_dir = Path(args.get("save_dir") or root)
        name, version = args.get("name", "lightning_logs"), args.get("version")
    elif logger is False:
        return [(root, None)], ""
    else:
        return [], (f"the logger ({logger.get('class_path') if isinstance(logger, dict) else logger!r}) is not one of "
                    f"{VERSIONED_LOGGERS}: no run folder to continue in")
    base = save_dir / name if name else save_dir
    if version is not None:
        v = version if isinstance(version, str) else f"version_{version}"
        return [(base / v, v)], ""

    def number(p: Path) -> int:
        m = re.fullmatch(r"version_(\d+)", p.name)
        return int(m.group(1)) if m else -1

    found = sorted((p for p in base.glob("version_*") if p.is_dir() and number(p) >= 0), key=number, reverse=True)
    return [(p, p.name) for p in found], ""


def _refuse_if_alive(running: Path) -> None:
    """Stop when the process that trains into this folder is still alive on this machine (left by a killed
    parent, or launched twice): two runs must not write one folder. A stale mark (its process gone) is ignored."""
    if not running.is_file():
        return
    try:
        info = json.loads(running.read_text())
        host, pid = info["host"], int(info["pid"])
    except (ValueError, KeyError, TypeError):
        return
    if host != socket.gethostname() or pid == os.getpid():
        return  # another machine's process cannot be checked from here (a requeued job's is gone)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    except PermissionError:
        pass  # alive, another user's
    raise SystemExit(f"[resume] {running.parent} is being trained by process {pid} on this machine right now "
                     f"({running}): stop it (kill -TERM {pid} saves a checkpoint) and run again, or pass "
                     "--resume.auto false to start a separate run")


def _hpc_checkpoint(cfg: dict) -> Path | None:
    """Lightning's newest SLURM requeue checkpoint in ``default_root_dir`` (only inside a SLURM job)."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return None
    root = Path(cfg.get("trainer", {}).get("default_root_dir") or ".")
    found = [(int(m.group(1)), p) for p in root.glob("hpc_ckpt_*.ckpt")
             if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))]
    return max(found)[1] if found else None


def find_unfinished(cfg: dict, log=print) -> Found | None:
    """This fit config's own unfinished checkpoint, or None (see the module docstring)."""
    runs, why = _runs(cfg)
    if why:
        log(f"[resume] not looking for a checkpoint to continue: {why}")
        return None
    explicit = _checkpoint_dirs(cfg)
    found = None
    for run_dir, version in runs:
        saved_cfg = run_dir / "config.yaml"
        if not saved_cfg.is_file():
            continue
        dirs = explicit or [run_dir / "checkpoints"]
        last = next((d / LAST for d in dirs if (d / LAST).exists()), None)
        diff = config_differences(yaml.safe_load(saved_cfg.read_text()) or {}, cfg)
        if diff:
            if last is not None and not (last.parent / FINISHED).exists():
                log(f"[resume] {last} is unfinished but its run's config differs ({', '.join(diff[:6])}"
                    f"{', ...' if len(diff) > 6 else ''}): starting a new run (--ckpt_path {last} continues it anyway)")
            continue
        # the newest run of this config decides: finished, or never checkpointed -> start afresh
        if last is not None and not (last.parent / FINISHED).exists():
            _refuse_if_alive(last.parent / RUNNING)
            found = Found(ckpt=last, step=checkpoint_step(last), version=version, run_dir=run_dir)
        break
    hpc = _hpc_checkpoint(cfg)
    if hpc is not None:
        step = checkpoint_step(hpc)
        if found is None or step >= found.step:
            found = Found(ckpt=hpc, step=step, version=found.version if found else None,
                          run_dir=found.run_dir if found else hpc.parent)
    return found
