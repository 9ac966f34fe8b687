"""Sweeps as Optuna studies: samplers that learn, pruning on the in-loop curves, many workers on one study.

    python -m instaflow.tools.sweep experiments/sweeps/reflow_lr.yaml                 # one worker here; resumes
    python -m instaflow.tools.sweep experiments/sweeps/reflow_lr.yaml --workers 4     # 4 worker processes here
    python -m instaflow.tools.sweep experiments/sweeps/reflow_lr.yaml --worker        # one worker loop (a job's task)
    python -m instaflow.tools.sweep experiments/sweeps/reflow_lr.yaml --dry-run       # the trials' commands
    python -m instaflow.tools.sweep experiments/sweeps/reflow_lr.yaml --slurm --nodes 1 --gpus-per-node 8 \\
        --partition gpu [--workers 4] [--dry-run]                                    # a SLURM array of workers
    python -m instaflow.tools.sweep experiments/sweeps/reflow_lr.yaml --report        # plots + ranked table
    python -m instaflow.tools.sweep experiments/sweeps/reflow_lr.yaml --retry-failed  # failed trials queued again

A sweep file (experiments/sweeps/*.yaml); every key is checked and a wrong one is named:

    configs: [embedded/reflow]     # experiment names (their whole chain) or .yaml files, in order
    command: fit
    save_dir: runs/sweeps          # trial runs land in SAVE_DIR/NAME/<version>; NAME is the file's stem
    metric: val/loss               # the objective: any scalar the runs log (quality/fid_1step, ...)
    mode: min                      # or max
    grid: {model.init_args.lr: [1.0e-4, 3.0e-4], data.init_args.batch_size: [32, 64]}   # every point once
    # or a search space and a number of trials:
    space: {model.init_args.lr: {log_uniform: [1.0e-5, 1.0e-3]}, model.init_args.w: {uniform: [0, 1]},
            data.init_args.batch_size: {int: [16, 64]}, model.init_args.loss: {categorical: [l2, lpips]}}
    n_trials: 16
    sampler: tpe                   # grid (the default with `grid`), random, tpe (the default with `space`);
                                   # or {name: tpe, seed: 0, n_startup_trials: 4, ...} (Optuna's arguments)
    pruner: successive_halving     # none (default), median, successive_halving, hyperband; or {name: .., ...}
    storage: sqlite:///runs/sweeps/reflow_lr/study.db   # default; postgresql://user@host/db; journal:///path.log
    study: reflow_lr               # the study's name in the storage (default: NAME)
    heartbeat: {interval: 60, grace: 180, max_retry: 3}   # RDB storages: a dead worker's trial is failed, retried
    short: {model.init_args.lr: lr, data.init_args.batch_size: bs}   # version names: 003-lr=1e-4,bs=32
    fixed: {model.init_args.export_dir: "{save_dir}/{name}/{version}/model"}   # every trial's run
    entry: lightning_modules.cli   # the module each trial runs (python -m ENTRY COMMAND ARGS...)

How a study runs. The first worker to create the study queues every trial in it (a grid's points, or
``n_trials`` open trials whose values the sampler draws when a worker takes one), so workers take
trials from one queue and none runs twice or is lost, whatever the storage. A worker takes a queued
trial, runs ``python -m ENTRY COMMAND -c ... --key value ...`` (with ``--launcher srun|torchrun``, over
the allocation) with ``callbacks.optuna_trial.OptunaTrial`` added and the trial named in the
environment (``INSTAFLOW_SWEEP_*``); that callback reports the metric at every validation and stops a
pruned run cleanly. When the run ends the worker tells the study COMPLETE (the last reported value),
PRUNED or FAIL, and writes the TensorBoard HParams event of the trial's run. A rerun of the same
command loads the study and goes on with what is left (a changed search space is refused).

A worker that dies leaves its trial RUNNING. On an RDB storage (SQLite, PostgreSQL) each worker
beats for its trial every ``heartbeat.interval`` s; a trial without a beat for ``heartbeat.grace`` s is
failed by the next worker that looks and queued again (Optuna's RetryHeartbeatStaleTrialCallback, at most
``max_retry`` times; the retry keeps the version folder, so its run resumes from its checkpoint). A
journal file has no heartbeats; there the rule is: a RUNNING trial whose worker ran on this host and
whose process (pid and start time) no longer exists is failed and queued again by any worker of the
study on that host when it starts and before each trial. Workers wait while trials are still
running elsewhere (one of them may fail and come back) and stop when none is queued or running.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from callbacks.optuna_study import (DEFAULT_HEARTBEAT, ENV_METRIC, ENV_PRUNER, ENV_STORAGE, ENV_STUDY, ENV_TRIAL,
                                    PRUNERS, build, check_storage, make_pruner, named, open_storage)
from instaflow.experiments import chain
from instaflow.tools import launch

VERSION_CHAR = re.compile(r"[A-Za-z0-9._=,+-]")
MAX_VERSION = 120  # well under a file name's 255 bytes
CALLBACK = "callbacks.optuna_trial.OptunaTrial"
SAMPLERS = ("grid", "random", "tpe")
KINDS = ("uniform", "log_uniform", "int", "int_uniform", "log_int", "categorical")


def safe_version(text: str) -> str:
    """``text`` as one safe folder name: other characters (and a leading '.') %-escaped, a long one hashed."""
    out = "".join(c if VERSION_CHAR.fullmatch(c) else "".join(f"%{b:02X}" for b in c.encode()) for c in text)
    if out.startswith("."):  # never ".", "..", or a hidden folder
        out = "%2E" + out[1:]
    if len(out) > MAX_VERSION:
        out = out[:MAX_VERSION - 17] + "-" + hashlib.sha256(text.encode()).hexdigest()[:16]
    return out


def config_args(configs: list[str]) -> list[str]:
    """``-c`` arguments: an experiment name stands for its chain (``instaflow.experiments``), a .yaml file
    for itself; a file already in the list is not repeated."""
    files: list[str] = []
    for c in configs:
        for f in ([c] if c.endswith((".yaml", ".yml")) else [str(p) for p in chain(c)]):
            if f not in files:
                files.append(f)
    return [a for f in files for a in ("-c", f)]


@dataclass
class Sweep:
    configs: list[str]
    name: str
    metric: str
    mode: str = "min"
    command: str = "fit"
    save_dir: str = "runs/sweeps"
    grid: dict | None = None
    space: dict | None = None
    random: dict | None = None  # the old form {n, seed, space}: a random sampler over `space`
    n_trials: int | None = None
    sampler: str | dict | None = None
    pruner: str | dict = "none"
    storage: str | None = None
    study: str | None = None
    heartbeat: dict = field(default_factory=dict)
    short: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    entry: str = launch.CLI_MODULE
    path: str = ""  # the file it was read from (not a key of the file)

    def __post_init__(self) -> None:
        launch.check_name(self.name, "sweep name")  # names the folder, the SLURM job and its script
        launch.check_name(self.study_name, "study name")
        if self.random is not None:  # the runner before Optuna: keep such files working
            if self.space is not None or self.grid is not None:
                raise ValueError("'random': give it alone, without 'grid' or 'space'")
            bad = set(self.random) - {"n", "seed", "space"}
            if bad or "n" not in self.random or "space" not in self.random:
                raise ValueError(f"'random': {{n, seed, space}}, got keys {sorted(self.random)}")
            self.space, self.n_trials = self.random["space"], self.random["n"]
            self.sampler = self.sampler or {"name": "random", "seed": self.random.get("seed", 0)}
            self.random = None
        if (self.grid is None) == (self.space is None):
            raise ValueError("give exactly one of 'grid' or 'space'")
        if self.mode not in ("min", "max"):
            raise ValueError(f"'mode': min or max, got {self.mode!r}")
        if not isinstance(self.configs, list) or not self.configs:
            raise ValueError(f"'configs': a list of experiment names or .yaml files, got {self.configs!r}")
        for key in ("short", "fixed", "heartbeat"):
            if not isinstance(getattr(self, key), dict):
                raise ValueError(f"'{key}': a mapping, got {getattr(self, key)!r}")
        if self.grid is not None:
            if not isinstance(self.grid, dict) or not self.grid:
                raise ValueError(f"'grid': a mapping of dotted keys to lists of values, got {self.grid!r}")
            for k, vals in self.grid.items():
                if not isinstance(vals, list) or not vals:
                    raise ValueError(f"'grid.{k}': a non-empty list of values, got {vals!r}")
                for v in vals:
                    if not (v is None or isinstance(v, (bool, int, float, str))):
                        raise ValueError(f"'grid.{k}': values are numbers, strings, booleans or null, got {v!r}")
            if self.n_trials is not None:
                raise ValueError("'n_trials': a grid runs each of its points once; give it only with 'space'")
        else:
            if not isinstance(self.space, dict) or not self.space:
                raise ValueError(f"'space': a mapping of dotted keys to distributions, got {self.space!r}")
            if not isinstance(self.n_trials, int) or isinstance(self.n_trials, bool) or self.n_trials < 1:
                raise ValueError(f"'n_trials': a positive number of trials with 'space', got {self.n_trials!r}")
            self.distributions()  # checks every entry, naming it
        name, _ = named(self.sampler_spec, "sampler", SAMPLERS)
        if (name == "grid") != (self.grid is not None):
            raise ValueError(f"'sampler': '{name}' with {'a grid' if self.grid is not None else 'a space'}: "
                             "the grid sampler goes with 'grid', random and tpe with 'space'")
        named(self.pruner, "pruner", PRUNERS)
        bad = set(self.heartbeat) - set(DEFAULT_HEARTBEAT)
        if bad:
            raise ValueError(f"'heartbeat.{sorted(bad)[0]}': unknown; the keys are {sorted(DEFAULT_HEARTBEAT)}")
        self.sampler_obj(), self.pruner_obj()  # their arguments, checked now rather than in a worker
        check_storage(self.storage_url)

    @classmethod
    def load(cls, path: str | Path) -> "Sweep":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no sweep file {path}: give SWEEP=experiments/sweeps/<name>.yaml")
        spec = yaml.safe_load(path.read_text()) or {}
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: a mapping of sweep keys, got {type(spec).__name__}")
        keys = set(cls.__dataclass_fields__) - {"path"}
        for key in spec:
            if key not in keys:
                raise ValueError(f"{path}: unknown key '{key}' (the keys are {sorted(keys)})")
        for key in ("configs", "metric"):
            if key not in spec:
                raise ValueError(f"{path}: missing '{key}'")
        try:
            return cls(**{"name": path.stem, **spec, "path": str(path)})
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    # -- the study ---------------------------------------------------------------------------------------------
    @property
    def study_name(self) -> str:
        return self.study or self.name

    @property
    def root(self) -> Path:
        return Path(self.save_dir) / self.name

    @property
    def storage_url(self) -> str:
        url = self.storage or f"sqlite:///{self.root}/study.db"
        return url.format(save_dir=self.save_dir, name=self.name)

    @property
    def sampler_spec(self):
        return self.sampler or ("grid" if self.grid is not None else "tpe")

    @property
    def beat(self) -> dict:
        return {**DEFAULT_HEARTBEAT, **self.heartbeat}

    def distributions(self) -> dict:
        """The search space as Optuna distributions (the grid's as categorical ones)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.grid is not None:
            return {k: CategoricalDistribution(v) for k, v in self.grid.items()}
        out = {}
        for key, dist in self.space.items():
            if isinstance(dist, list):
                dist = {"categorical": dist}
            if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in KINDS:
                raise ValueError(f"'space.{key}': a list of choices or one of {{{'|'.join(KINDS)}: ..}}, got {dist!r}")
            (kind, args), = dist.items()
            if kind == "categorical":
                if not isinstance(args, list) or not args or not all(
                        v is None or isinstance(v, (bool, int, float, str)) for v in args):
                    raise ValueError(f"'space.{key}.categorical': a list of numbers, strings, booleans, got {args!r}")
                out[key] = CategoricalDistribution(args)
                continue
            if not isinstance(args, list) or len(args) not in (2, 3) or not all(
                    isinstance(a, (int, float)) and not isinstance(a, bool) for a in args) or args[0] >= args[1]:
                raise ValueError(f"'space.{key}.{kind}': [low, high] (or [low, high, step]) with low < high, "
                                 f"got {args!r}")
            lo, hi, *step = args
            if kind in ("log_uniform", "log_int") and lo <= 0:
                raise ValueError(f"'space.{key}.{kind}': a log scale needs low > 0, got {lo!r}")
            if kind in ("uniform", "log_uniform"):
                out[key] = FloatDistribution(lo, hi, log=kind == "log_uniform", step=step[0] if step else None)
            else:
                if not all(float(a).is_integer() for a in args):
                    raise ValueError(f"'space.{key}.{kind}': integers, got {args!r}")
                out[key] = IntDistribution(int(lo), int(hi), log=kind == "log_int", step=int(step[0]) if step else 1)
        return out

    def points(self) -> list[dict]:
        """The grid's points in order (every one becomes one queued trial)."""
        keys = list(self.grid)
        return [dict(zip(keys, vals)) for vals in itertools.product(*(self.grid[k] for k in keys))]

    def sampler_obj(self, trial_number: int | None = None):
        """The sampler; for trial n of a seeded one, seeded with seed + n (workers in separate processes would
        otherwise draw the same sequence: reproducible run alone, distinct across workers)."""
        import optuna

        name, kwargs = named(self.sampler_spec, "sampler", SAMPLERS)
        if trial_number is not None and kwargs.get("seed") is not None:
            kwargs = {**kwargs, "seed": int(kwargs["seed"]) + trial_number}
        if name == "grid":
            return build(optuna.samplers.GridSampler, kwargs, "sampler", search_space=self.grid)
        cls = optuna.samplers.RandomSampler if name == "random" else optuna.samplers.TPESampler
        return build(cls, kwargs, "sampler")

    def pruner_obj(self):
        return make_pruner(self.pruner)

    def fingerprint(self) -> str:
        """What a study is bound to: the metric, its direction and the search space (a rerun must match)."""
        space = self.grid if self.grid is not None else self.space
        return json.dumps({"metric": self.metric, "mode": self.mode, "space": space,
                           "n": len(self.points()) if self.grid is not None else self.n_trials}, sort_keys=True)

    # -- one trial's run ---------------------------------------------------------------------------------------
    def run_dir(self, version: str) -> Path:
        """SAVE_DIR/NAME/<version>, checked to be a folder directly inside SAVE_DIR/NAME."""
        path = self.root / version
        if path.resolve().parent != self.root.resolve():
            raise ValueError(f"sweep {self.name}: run folder {path} is not inside {self.root}")
        return path

    def version(self, number: int, params: dict) -> str:
        """``003-lr=1e-4,bs=32``: the trial number (a retry keeps its first trial's) and the overrides."""
        text = f"{number:03d}-" + ",".join(f"{self.short.get(k, k.rsplit('.', 1)[-1])}={_short(v)}"
                                           for k, v in params.items())
        version = safe_version(text)
        self.run_dir(version)
        return version

    def args(self, version: str, params: dict) -> list[str]:
        """The trial's CLI arguments: the configs, the fixed keys and its values, its logger folder, the callback."""
        args = [self.command] + config_args(self.configs)
        for k, v in {**self.fixed, **params}.items():
            v = v.format(version=version, name=self.name, save_dir=self.save_dir) if isinstance(v, str) else v
            args += [f"--{k}", _cli_value(v)]
        if self.entry == launch.CLI_MODULE:
            args += ["--trainer.logger.init_args.save_dir", self.save_dir, "--trainer.logger.init_args.name", self.name,
                     "--trainer.logger.init_args.version", version,
                     "--trainer.logger.init_args.default_hp_metric", "false",  # the sweep writes the hparams event
                     "--trainer.callbacks+", CALLBACK]
        return args


def _short(v) -> str:
    """Compact value for a version name: 0.0001 -> 1e-4, 0.25 -> 0.25, 32 -> 32."""
    if isinstance(v, float) and v != 0 and not 1e-3 <= abs(v) < 1e5:
        mantissa, exp = f"{v:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _cli_value(v) -> str:
    if isinstance(v, (list, dict, bool)) or v is None:
        return json.dumps(v)
    return str(v)


# -- storage ---------------------------------------------------------------------------------------------------
def has_heartbeat(storage) -> bool:
    """Whether the storage (or the cache a study wraps it in) beats: an RDB storage given an interval."""
    interval = getattr(storage, "get_heartbeat_interval", None)
    return interval is not None and interval() is not None


def open_study(sweep: Sweep, url: str | None = None, create: bool = True, wait_s: float = 120.0):
    """The sweep's study; the worker that creates it queues every trial, the others wait for that queue."""
    import optuna

    storage = open_storage(url or sweep.storage_url, sweep.beat)
    kw = {"study_name": sweep.study_name, "storage": storage, "sampler": sweep.sampler_obj(),
          "pruner": sweep.pruner_obj()}
    if not create:
        return optuna.load_study(**kw)
    try:
        study = optuna.create_study(direction="minimize" if sweep.mode == "min" else "maximize", **kw)
    except optuna.exceptions.DuplicatedStudyError:  # exactly one worker creates it (a unique name in the storage)
        study = optuna.load_study(**kw)
        deadline = time.time() + wait_s
        while "fingerprint" not in study.user_attrs:
            if time.time() > deadline:
                raise RuntimeError(f"study {sweep.study_name}: its trials were never queued (the worker that "
                                   "created it died?); delete the study and start again") from None
            time.sleep(0.5)
        if study.user_attrs["fingerprint"] != sweep.fingerprint():
            raise ValueError(f"study {sweep.study_name} in {url or sweep.storage_url} was made for another search "
                             f"space or metric ({study.user_attrs['fingerprint']}); give 'study' a new name") from None
        return study
    if sweep.grid is not None:
        for params in sweep.points():
            study.enqueue_trial(params)
    else:
        for _ in range(sweep.n_trials):
            study.enqueue_trial({})  # open: the sampler draws its values when a worker takes it
    study.set_user_attr("fingerprint", sweep.fingerprint())  # last: the queue is complete
    study.set_user_attr("sweep", sweep.name)
    return study


def _proc_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22) or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def worker_id() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _proc_start(os.getpid())}


def fail_dead_trials(study, max_retry: int | None = DEFAULT_HEARTBEAT["max_retry"]) -> list[int]:
    """Fail the study's stale RUNNING trials and queue their retries; the numbers failed here.

    RDB storages: Optuna's heartbeat rule (no beat for ``grace`` s). Other storages (journal): a trial
    whose worker ran on this host and whose process (pid + start time) is gone."""
    import copy

    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
    from optuna.trial import TrialState

    storage = study._storage
    if has_heartbeat(storage):
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        fail_stale_trials(study)
        return sorted({t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))} - before)
    failed = []
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w = t.user_attrs.get("worker")
        if not isinstance(w, dict) or w.get("host") != host or _proc_start(int(w["pid"])) == w.get("start"):
            continue  # another host's (not ours to judge), or its worker is alive
        try:
            storage.set_trial_user_attr(t._trial_id, "reason", f"worker {host}:{w['pid']} is gone")
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it first
            continue
        failed.append(t.number)
        retry = RetryHeartbeatStaleTrialCallback(max_retry, inherit_intermediate_values=True)
        retry(study, copy.deepcopy(storage.get_trial(t._trial_id)))
    return failed


def retry_failed(study, sweep: Sweep) -> list[int]:
    """Queue again every FAIL trial that no later trial retries (``--retry-failed``: a crash, a full disk); the
    numbers queued. Run by the command that starts the workers, never by the workers themselves (no race)."""
    import copy

    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}
    failed = [t for t in trials if t.state == TrialState.FAIL and t.number not in retried]
    for t in failed:
        RetryHeartbeatStaleTrialCallback(None, inherit_intermediate_values=True)(study, copy.deepcopy(t))
    return [t.number for t in failed]


def take_trial(study, sweep: Sweep):
    """A queued trial, now RUNNING and ours, or None: the storage lets one worker move it out of WAITING."""
    import optuna
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if study._storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                study.sampler = sweep.sampler_obj(t.number)
                return optuna.Trial(study, t._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def suggest(trial, sweep: Sweep) -> dict:
    """The trial's values: its queued ones (grid, retry) or the sampler's draw, in the file's key order."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    out = {}
    for key, d in sweep.distributions().items():
        if isinstance(d, CategoricalDistribution):
            out[key] = trial.suggest_categorical(key, d.choices)
        elif isinstance(d, FloatDistribution):
            out[key] = trial.suggest_float(key, d.low, d.high, log=d.log, step=d.step)
        else:
            out[key] = trial.suggest_int(key, d.low, d.high, log=d.log, step=d.step)
    return out


class Heartbeat:
    """Beats for one trial every ``interval`` s on a thread while its run goes (RDB storages only)."""

    def __init__(self, storage, trial_id: int) -> None:
        self.storage, self.trial_id, self.stop = storage, trial_id, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.storage.record_heartbeat(self.trial_id)
            if self.stop.wait(self.storage.get_heartbeat_interval()):
                return

    def __enter__(self):
        if has_heartbeat(self.storage):
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()


@dataclass
class Launcher:
    """How a worker starts a trial's run: here, over the allocation with srun, or with torchrun on this node."""

    kind: str = "local"
    world: launch.World = field(default_factory=launch.World)

    def command(self, entry: str, args: list[str]) -> list[str]:
        if self.kind == "local":
            return [sys.executable, "-m", entry, *args]
        if self.kind == "srun":
            return ["srun", "--kill-on-bad-exit=1", f"--nodes={self.world.nodes}",
                    f"--ntasks-per-node={self.world.devices}", sys.executable, "-m", entry, *args,
                    *self.world.overrides()]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                str(self.world.devices), "-m", entry, *args, *self.world.overrides()]


def _die_with_parent() -> None:
    """In the trial's process: SIGTERM when its worker dies (a killed worker leaves no orphan run reporting)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (AttributeError, OSError):
        pass


def run_trial(sweep: Sweep, study, trial, url: str, launcher: Launcher) -> str:
    """Run one taken trial to its end and tell the study; its final state's name."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    storage = study._storage
    params = suggest(trial, sweep)
    frozen = storage.get_trial(trial._trial_id)
    first = (RetryHeartbeatStaleTrialCallback.retry_history(frozen) or [trial.number])[0]
    version = sweep.version(first, params)
    for key, value in (("worker", worker_id()), ("version", version), ("pruned_step", None)):
        trial.set_user_attr(key, value)
    cmd = launcher.command(sweep.entry, sweep.args(version, params) + (
        ["--trainer.default_root_dir", str(sweep.run_dir(version))] if sweep.entry == launch.CLI_MODULE else []))
    env = {**os.environ, ENV_STORAGE: url, ENV_STUDY: sweep.study_name, ENV_TRIAL: str(trial._trial_id),
           ENV_METRIC: sweep.metric, ENV_PRUNER: json.dumps(sweep.pruner)}
    print(f"[sweep] trial {trial.number} ({version}): {launch._join(cmd)}", flush=True)
    with Heartbeat(storage, trial._trial_id):
        rc = subprocess.call(cmd, env=env, preexec_fn=_die_with_parent)
    frozen = storage.get_trial(trial._trial_id)
    trial.set_user_attr("returncode", rc)
    if frozen.user_attrs.get("pruned_step") is not None:
        study.tell(trial, state=TrialState.PRUNED)  # its value: the last reported one
    elif rc == 0 and frozen.last_step is not None:
        study.tell(trial, frozen.intermediate_values[frozen.last_step])
    else:
        trial.set_user_attr("reason", f"exit {rc}" if rc else f"no {sweep.metric} reported")
        study.tell(trial, state=TrialState.FAIL)
    final = storage.get_trial(trial._trial_id)
    log_hparams(sweep, final)
    print(f"[sweep] trial {trial.number} ({version}): {final.state.name} {final.value}", flush=True)
    return final.state.name


def log_hparams(sweep: Sweep, trial) -> None:
    """The HParams event of a trial's TensorBoard run: its values and the metric's value at its last step."""
    version = trial.user_attrs.get("version")
    if trial.value is None or not version or not sweep.run_dir(version).is_dir():
        return
    from lightning.pytorch.loggers import TensorBoardLogger

    step = final_step(sweep.run_dir(version), sweep.metric)
    logger = TensorBoardLogger(sweep.save_dir, name=sweep.name, version=version, default_hp_metric=False)
    logger.log_hyperparams(trial.params, {sweep.metric: trial.value}, step=step)  # the curve's last point
    logger.finalize("success")


def final_step(logdir: Path, tag: str) -> int | None:
    """The step of a scalar's last value in a run's event files (None if it never logged it)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    ea.Reload()
    if tag not in ea.Tags().get("scalars", []):
        return None
    return int(max(ea.Scalars(tag), key=lambda e: (e.step, e.wall_time)).step)


def work(sweep: Sweep, url: str, launcher: Launcher, poll_s: float | None = None) -> dict:
    """One worker loop: take queued trials until none is queued or running; counts of what it ended."""
    from optuna.trial import TrialState

    study = open_study(sweep, url)
    poll = poll_s if poll_s is not None else min(5.0, float(sweep.beat["interval"]))
    ended: dict[str, int] = {}
    while True:
        for n in fail_dead_trials(study, sweep.beat["max_retry"]):
            print(f"[sweep] trial {n}: its worker is gone; failed and queued again", flush=True)
        trial = take_trial(study, sweep)
        if trial is None:
            if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
                return ended
            time.sleep(poll)  # a running trial elsewhere may still fail and come back
            continue
        state = run_trial(sweep, study, trial, url, launcher)
        ended[state] = ended.get(state, 0) + 1


def run_workers(sweep: Sweep, a: argparse.Namespace, url: str) -> int:
    """N worker processes of this file on one study (the study is made first, so they only load it)."""
    open_study(sweep, url)
    cmd = [sys.executable, "-m", "instaflow.tools.sweep", sweep.path, "--worker", "--storage", url, "--launcher",
           a.launcher, "--nodes", str(a.nodes), "--gpus-per-node", str(a.gpus_per_node)]
    procs = [subprocess.Popen(cmd) for _ in range(a.workers)]
    return max(p.wait() for p in procs)


def array_script(sweep: Sweep, a: argparse.Namespace, url: str) -> str:
    """A SLURM array job: each task runs one worker loop, which starts each trial over the task's allocation."""
    world = launch.World(a.nodes, a.gpus_per_node)
    worker = [sys.executable, "-m", "instaflow.tools.sweep", sweep.path, "--worker", "--storage", url,
              "--launcher", "srun", "--nodes", str(world.nodes), "--gpus-per-node", str(world.devices)]
    n = a.workers or (len(sweep.points()) if sweep.grid is not None else sweep.n_trials)
    return launch.slurm_script([], world, array=[[launch.Stage("worker", worker)]] * n, job_name=f"sweep-{sweep.name}",
                               partition=a.partition, time=a.time, output=f"{a.dir}/%x-%A_%a.out", run_dir=a.dir)


def dry_run(sweep: Sweep) -> str:
    """The trials' commands as a worker would start them (a space's values are drawn when a trial starts)."""
    if sweep.grid is not None:
        rows = [(i, p) for i, p in enumerate(sweep.points())]
    else:
        rows = [(0, {k: f"<{k}>" for k in sweep.space})]
    lines = [launch._join(Launcher().command(sweep.entry, sweep.args(sweep.version(i, p), p))) for i, p in rows]
    if sweep.grid is None:
        lines.append(f"# ... {sweep.n_trials} trials; the sampler draws each trial's values when it starts")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sweep", help="experiments/sweeps/<name>.yaml")
    p.add_argument("--storage", help="the study's storage URL (default: the file's 'storage')")
    p.add_argument("--workers", type=int, help="local worker processes (default 1); with --slurm: array tasks")
    p.add_argument("--worker", action="store_true", help="run one worker loop (what each job task runs)")
    p.add_argument("--launcher", choices=("local", "srun", "torchrun"), default="local",
                   help="how a worker starts each trial's run")
    p.add_argument("--dry-run", action="store_true", help="print the commands (or the array script); run nothing")
    p.add_argument("--report", action="store_true", help="plots and a ranked table of the study (make sweep-report)")
    p.add_argument("--retry-failed", action="store_true", help="queue the study's failed trials again first")
    g = p.add_argument_group("world of each trial (--launcher srun|torchrun) and SLURM array of workers")
    g.add_argument("--slurm", action="store_true")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=1)
    g.add_argument("--partition")
    g.add_argument("--time")
    g.add_argument("--dir", default="runs/slurm")
    g.add_argument("--sbatch", default="sbatch")
    a = p.parse_args(argv)
    try:
        sweep = Sweep.load(a.sweep)
        url = a.storage or sweep.storage_url
        if a.report:
            from instaflow.tools.sweep_report import report

            return report(sweep, url)
        if a.retry_failed and not a.dry_run:
            print(f"[sweep] queued again: failed trials {retry_failed(open_study(sweep, url), sweep)}", flush=True)
        if a.slurm:
            script = array_script(sweep, a, url)
            if a.dry_run:
                print(script, end="")
                return script
            open_study(sweep, url)  # made and queued once here, so the tasks only load it
            Path(a.dir).mkdir(parents=True, exist_ok=True)
            job = launch.submit(script, Path(a.dir) / f"sweep-{sweep.name}.sbatch", a.sbatch)
            print(f"submitted the workers of study {sweep.study_name} as SLURM array job {job}; "
                  f"afterwards: python -m instaflow.tools.sweep {a.sweep} --report")
            return job
        if a.dry_run:
            text = dry_run(sweep)
            print(text, end="")
            return text
        if a.worker or (a.workers or 1) == 1:
            launcher = Launcher(a.launcher, launch.World(a.nodes, a.gpus_per_node))
            ended = work(sweep, url, launcher)
            print(f"[sweep] worker {os.getpid()} done: {ended or 'nothing left to run'}", flush=True)
            if a.worker:
                return ended
        else:
            rc = run_workers(sweep, a, url)
            if rc:
                raise SystemExit(f"sweep: a worker exited with status {rc}")
        from instaflow.tools.sweep_report import report

        return report(sweep, url, plots=False)
    except ValueError as e:  # a malformed sweep file or storage URL: say what, no traceback
        raise SystemExit(f"sweep: {e}") from None


if __name__ == "__main__":
    out = main()
    # a failed trial fails `make sweep` (after the table is written); printing or submitting succeeds
    sys.exit(1 if isinstance(out, dict) and out.get("failed") else 0)
