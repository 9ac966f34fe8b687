"""Find a fit's own unfinished checkpoint, so running the same command again continues it.

A run is the fit's logger version folder (``<save_dir>/<name>/version_<n>``, where LightningCLI
saves ``config.yaml`` and ``ModelCheckpoint`` its ``checkpoints/``; an explicit checkpoint
``dirpath`` is used instead when the config sets one). The newest run whose saved config equals
this one's is looked at, and continued when it has checkpoints and no ``fit_finished.json``
(``instaflow.resume.marks``): the CLI passes ``ckpt_path`` and the run's version, so the curves,
checkpoints and export go on in the same folder. Lightning restores step, optimizer, LR scheduler
and callback states (EMA) from the checkpoint.

Which checkpoint: the newest *readable* one of the run (``newest_readable``): ``last.ckpt``,
``step=*.ckpt``, FSDP2 folders (and one an interrupted swap left aside), by their stored step.
Readable means it loads with ``weights_only=True`` (a folder: complete, its DCP metadata through the
allow-list), holds no NaN/inf, and was written by this run (each checkpoint stores its run folder,
``marks.RUN_STATE_KEY``; a shared ``dirpath`` holds other runs' too). What is skipped is said, with
why. A file that names code to run (``UnsafeCheckpoint``) is never skipped silently: the fit stops,
naming it.

"Equal" ignores what says where or how a run is launched, not what it trains: ``ckpt_path``, the
logger's ``version`` and ``purge_step`` (the CLI sets both on resume; TensorBoard then hides what
the stopped run logged after its checkpoint), ``trainer.default_root_dir`` (the SLURM launcher
keys it by job id), ``trainer.plugins`` and ``weights_only``; anything else (another learning rate,
more steps) is a different run and starts afresh, with a message naming the differing keys.

Under SLURM a requeued job also has Lightning's ``hpc_ckpt_<n>.ckpt`` (saved on the requeue
signal) in ``default_root_dir``: the newer readable one of it and the run's checkpoint is used.

A run still training on this machine (``fit_running.json`` names a live process: same host, boot,
pid and start time) is not continued a second time; only global rank 0 refuses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from instaflow.resume.checkpoints import UnreadableCheckpoint, UnsafeCheckpoint, checkpoint_meta
from instaflow.resume.marks import RUNNING, checkpoint_owner, same_run, unfinished
from instaflow.resume.refusals import non_finite_file, refuse_if_alive
from instaflow.state import OLD_MARK

LAST = "last.ckpt"
# launch-only keys: a requeued or resubmitted run of the same experiment may differ in these
IGNORED = ("ckpt_path", "trainer.logger.init_args.version", "trainer.logger.init_args.purge_step",
           "trainer.default_root_dir", "trainer.plugins", "weights_only")
VERSIONED_LOGGERS = ("TensorBoardLogger", "CSVLogger")


@dataclass
class Found:
    """What to continue: the checkpoint, its step, and the logger version to log into (None: no versioned logger)."""

    ckpt: Path
    step: int
    version: str | None
    run_dir: Path

    def logger_settings(self, logger_class_path: str) -> dict[str, Any]:
        """The logger's ``init_args`` that continue the run's curves: its version, and for TensorBoard the first
        step to keep (TensorBoard hides what the killed run logged after the checkpoint)."""
        if self.version is None:
            return {}
        if logger_class_path.endswith("TensorBoardLogger"):
            return {"version": self.version, "purge_step": self.step + 1}
        return {"version": self.version}

    def message(self) -> str:
        """What the launch says when it continues this checkpoint."""
        return (f"[resume] continuing {self.run_dir} from step {self.step} ({self.ckpt}); "
                "--resume.auto false starts a new run instead")


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


def candidates(dirs: list[Path]) -> list[Path]:
    """Every checkpoint in a run's checkpoint folders: ``*.ckpt`` files and folders, and a folder that an
    interrupted swap left aside (``instaflow.state``'s ``.<name>.old-*``) while ``<name>`` is missing."""
    out = []
    for d in dirs:
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if p.name.endswith(".ckpt") and not p.name.startswith("."):
                out.append(p)
            elif p.name.startswith(".") and OLD_MARK in p.name and p.is_dir():
                if not (d / p.name[1:p.name.index(OLD_MARK)]).exists():
                    out.append(p)
    return out


def _probe(path: Path, run_dir: Path | None) -> tuple[int | None, str]:
    """(step, "") of a checkpoint this run can continue from, or (None, why not). An unsafe file raises."""
    try:
        meta = checkpoint_meta(path)
        step = int(meta["global_step"])
    except UnreadableCheckpoint as exn:
        return None, str(exn)
    except (KeyError, TypeError, ValueError):
        return None, f"{path} holds no global_step: not a Lightning checkpoint"
    owner = checkpoint_owner(meta)
    if owner and run_dir is not None and not same_run(owner, run_dir):
        return None, f"another run's ({owner})"
    return step, ""


def newest_readable(paths: list[Path], run_dir: Path | None, log=print) -> tuple[Path, int] | None:
    """The checkpoint with the highest step among ``paths`` that loads safely, is complete and finite (ties:
    ``last.ckpt`` first); says what it skipped and why. ``UnsafeCheckpoint`` propagates (never skipped)."""
    probed = [(p, *_probe(p, run_dir)) for p in paths]
    others = [p for p, step, why in probed if why.startswith("another run")]
    skipped = [(p, why) for p, step, why in probed if step is None and p not in others]
    chosen = None
    for step, _, p in sorted(((s, p.name == LAST, p) for p, s, _ in probed if s is not None), reverse=True):
        why = non_finite_file(p)
        if why is None:
            chosen = (p, step)
            break
        skipped.append((p, why))
    for p, why in skipped:
        log(f"[resume] skipping {p}: {why}")
    if others:
        log(f"[resume] ignoring {len(others)} checkpoint(s) of other runs in the same folder")
    return chosen


def _hpc_checkpoints(cfg: dict) -> list[Path]:
    """Lightning's SLURM requeue checkpoints in ``default_root_dir`` (only inside a SLURM job)."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return []
    root = Path(cfg.get("trainer", {}).get("default_root_dir") or ".")
    return [p for p in root.glob("hpc_ckpt_*.ckpt") if re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name)]


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
        ckpts = candidates(dirs)
        can_continue = unfinished(dirs, ckpts)
        diff = config_differences(yaml.safe_load(saved_cfg.read_text()) or {}, cfg)
        if diff:
            if can_continue:
                log(f"[resume] {dirs[0]} holds an unfinished run but its config differs ({', '.join(diff[:6])}"
                    f"{', ...' if len(diff) > 6 else ''}): starting a new run (--ckpt_path <checkpoint> continues "
                    "it anyway)")
            continue
        # the newest run of this config decides: finished, or never checkpointed -> start afresh
        if can_continue:
            for d in dirs:
                refuse_if_alive(d / RUNNING)
            best = newest_readable(ckpts, run_dir, log)
            if best is None:
                log(f"[resume] no readable checkpoint in {', '.join(map(str, dirs))}: starting afresh")
            else:
                found = Found(ckpt=best[0], step=best[1], version=version, run_dir=run_dir)
        break
    hpc = newest_readable(_hpc_checkpoints(cfg), None, log)
    if hpc is not None and (found is None or hpc[1] >= found.step):
        found = Found(ckpt=hpc[0], step=hpc[1], version=found.version if found else None,
                      run_dir=found.run_dir if found else hpc[0].parent)
    return found


def continue_from(cfg: dict, log=print) -> Found | None:
    """``find_unfinished`` for the CLI: a checkpoint that names code to run stops the launch, naming it."""
    try:
        return find_unfinished(cfg, log=log)
    except UnsafeCheckpoint as exn:
        raise SystemExit(f"[resume] {exn}") from exn
