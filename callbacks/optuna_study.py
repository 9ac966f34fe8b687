"""A sweep trial's side of its Optuna study, without Lightning: storages by URL, pruners by name, the reporter.

``instaflow.tools.sweep`` (the workers) and ``callbacks.optuna_trial`` (the trial's run) both use it; a trial's
run learns its trial from the environment its worker sets (the storage URL stays off the command line: it may
hold a password):

    INSTAFLOW_SWEEP_STORAGE   the storage URL            INSTAFLOW_SWEEP_METRIC   the objective's scalar
    INSTAFLOW_SWEEP_STUDY     the study's name           INSTAFLOW_SWEEP_PRUNER   the sweep file's pruner (JSON)
    INSTAFLOW_SWEEP_TRIAL_ID  the trial's id in the storage

Kept free of Lightning so that a run that is not a Lightning fit (the tests' stand-in) reports the same way.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import warnings
from pathlib import Path

ENV_STORAGE, ENV_STUDY, ENV_TRIAL, ENV_METRIC, ENV_PRUNER = (
    "INSTAFLOW_SWEEP_STORAGE", "INSTAFLOW_SWEEP_STUDY", "INSTAFLOW_SWEEP_TRIAL_ID", "INSTAFLOW_SWEEP_METRIC",
    "INSTAFLOW_SWEEP_PRUNER")
PRUNERS = ("none", "median", "successive_halving", "hyperband")
DEFAULT_HEARTBEAT = {"interval": 60, "grace": 180, "max_retry": 3}


def named(spec, what: str, names: tuple[str, ...]) -> tuple[str, dict]:
    """``tpe`` or ``{name: tpe, **kwargs}`` -> (name, kwargs), the name checked."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError(f"'{what}': give a name ({'|'.join(names)}) or {{name: .., <arguments>}}, got {spec!r}")
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    if spec["name"] not in names:
        raise ValueError(f"'{what}.name': one of {'|'.join(names)}, got {spec['name']!r}")
    return spec["name"], kwargs


def build(cls, kwargs: dict, what: str, **given):
    """``cls(**given, **kwargs)``, a keyword that ``cls`` does not take named (rather than Optuna's TypeError)."""
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    for key in kwargs:
        if key not in accepted or key in given:
            raise ValueError(f"'{what}.{key}': not an argument of {cls.__name__} "
                             f"(it takes {sorted(accepted - set(given))})")
    return cls(**given, **kwargs)


def make_pruner(spec):
    """``median`` or ``{name: successive_halving, min_resource: 2, ...}`` -> the Optuna pruner."""
    import optuna

    name, kwargs = named(spec, "pruner", PRUNERS)
    cls = {"none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
           "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
           "hyperband": optuna.pruners.HyperbandPruner}[name]
    return build(cls, kwargs, "pruner")


def check_storage(url: str) -> str:
    if not (url.startswith("journal://") or url.endswith(".log")
            or re.match(r"(sqlite|postgresql|mysql)(\+\w+)?://", url)):
        raise ValueError(f"'storage': sqlite:///path.db, postgresql://user@host:port/db, journal:///path.log; "
                         f"got {url!r}")
    return url


def open_storage(url: str, beat: dict | None = None):
    """An Optuna storage from a URL: sqlite:///.., postgresql://.., mysql://.. (RDB; with heartbeats and the retry
    of a stale trial when ``beat`` is given), journal:///path or a path ending in .log (Optuna's journal file)."""
    import optuna
    from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Optuna marks the heartbeat retry "experimental": it is the documented way, used as documented
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    check_storage(url)
    if url.startswith("journal://") or url.endswith(".log"):
        path = Path(url[len("journal://"):] if url.startswith("journal://") else url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    engine = {}
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        engine = {"connect_args": {"timeout": 120}}  # several worker processes write one file: wait for its lock
    beat_kw = {}
    if beat is not None:
        beat_kw = {"heartbeat_interval": int(beat["interval"]), "grace_period": int(beat["grace"]),
                   "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(
                       beat["max_retry"], inherit_intermediate_values=True)}
    return RDBStorage(url, engine_kwargs=engine, **beat_kw)


class TrialReporter:
    """A trial's run, rank 0: report a value at a step; say whether to stop (pruned, or the trial is no longer
    RUNNING: failed as stale while the run went on, and queued again for another worker)."""

    def __init__(self, storage: str, study: str, trial_id: int, metric: str, pruner) -> None:
        import optuna

        self.metric = metric
        # no heartbeat settings: beating for the trial is its worker's job
        self.study = optuna.load_study(study_name=study, storage=open_storage(storage), pruner=make_pruner(pruner),
                                       sampler=optuna.samplers.RandomSampler())
        self.trial = optuna.Trial(self.study, trial_id)

    @classmethod
    def from_env(cls) -> "TrialReporter | None":
        """The trial its worker named in the environment, or None (a run started by hand)."""
        names = (ENV_STORAGE, ENV_STUDY, ENV_TRIAL, ENV_METRIC, ENV_PRUNER)
        if not all(os.environ.get(k) for k in names):
            return None
        return cls(os.environ[ENV_STORAGE], os.environ[ENV_STUDY], int(os.environ[ENV_TRIAL]),
                   os.environ[ENV_METRIC], json.loads(os.environ[ENV_PRUNER]))

    def report(self, value: float, step: int) -> bool:
        """Report ``value`` at ``step``; True when the run should stop."""
        import optuna

        try:
            if not math.isfinite(value):  # a diverged run is what pruning is for: the worst value, not NaN
                value = float("inf") if self.study.direction.name == "MINIMIZE" else float("-inf")
            self.trial.report(value, step)
            if self.trial.should_prune():
                self.trial.set_user_attr("pruned_step", int(step))
                return True
        except optuna.exceptions.UpdateFinishedTrialError:  # failed as stale: another worker retries it
            return True
        return False
