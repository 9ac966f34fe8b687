"""Grid or random search over dotted config keys; each run is one LightningCLI call; a table ranks them.

    python -m instaflow.tools.sweep experiments/sweeps/reflow_lr.yaml              # runs one after another here
    python -m instaflow.tools.sweep experiments/sweeps/reflow_lr.yaml --dry-run    # print the run commands
    python -m instaflow.tools.sweep experiments/sweeps/reflow_lr.yaml --slurm --nodes 1 --gpus-per-node 8 \\
        --partition gpu [--dry-run]                                                  # one SLURM array task per run
    python -m instaflow.tools.sweep experiments/sweeps/reflow_lr.yaml --summarize  # after the array finished

A sweep file (experiments/sweeps/*.yaml) names the config files, the values to search, the metric:

    configs: [embedded/reflow]     # experiment names (their whole chain) or .yaml files, in order
    command: fit
    save_dir: runs/sweeps              # runs land in SAVE_DIR/NAME/<version>; NAME is the file's stem
    metric: val/loss                   # a scalar the runs log; the last value ranks them
    mode: min
    grid: {model.init_args.lr: [1.0e-4, 3.0e-4], data.init_args.batch_size: [32, 64]}
    # or random: {n: 8, seed: 0, space: {model.init_args.lr: {log_uniform: [1.0e-5, 1.0e-3]}, ...}}
    short: {model.init_args.lr: lr, data.init_args.batch_size: bs}   # version names: lr=1e-4,bs=32
    fixed: {model.init_args.export_dir: "{save_dir}/{name}/{version}/model"}   # every run; {save_dir} {name} {version} filled in

Each run's TensorBoardLogger gets ``version`` = its overrides (``lr=1e-4,bs=32``) and
``default_hp_metric: false``; when the run ends, the sweep reads the metric's last value from the
run's event files and calls ``TensorBoardLogger.log_hyperparams(params, {metric: value})`` on the
same version folder, so TensorBoard's HParams tab lists every run with its values and metric.
A run whose folder already holds ``sweep_run.json`` is finished and is not run again (a sweep resumes).

A version name is one folder inside SAVE_DIR/NAME whatever the values: characters other than
letters, digits and ``._=,+-`` are %-escaped (``/`` -> ``%2F``), a leading ``.`` too, and a name
longer than 120 characters is cut and ends with a hash of the whole; the sweep checks that every
run's folder resolves inside SAVE_DIR/NAME. Records and summaries are written atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import random
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from instaflow.experiments import chain
from instaflow.state import atomic_write_json, atomic_write_text, read_json
from instaflow.tools import launch

RECORD = "sweep_run.json"  # written into each finished run's version folder
VERSION_CHAR = re.compile(r"[A-Za-z0-9._=,+-]")
MAX_VERSION = 120  # well under a file name's 255 bytes


def safe_version(text: str) -> str:
    """``text`` as one safe folder name: other characters (and a leading '.') %-escaped, a long one hashed."""
    out = "".join(c if VERSION_CHAR.fullmatch(c) else "".join(f"%{b:02X}" for b in c.encode()) for c in text)
    if out.startswith("."):  # never ".", "..", or a hidden folder
        out = "%2E" + out[1:]
    if len(out) > MAX_VERSION:
        out = out[:MAX_VERSION - 17] + "-" + hashlib.sha256(text.encode()).hexdigest()[:16]
    return out


@dataclass
class Run:
    """One point of the sweep: its version name, its swept values, its CLI arguments."""

    version: str
    params: dict
    args: list[str]
    result: dict = field(default_factory=dict)



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
    random: dict | None = None
    short: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        launch.check_name(self.name, "sweep name")  # names the folder, the SLURM job and its script

    @classmethod
    def load(cls, path: str | Path) -> "Sweep":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no sweep file {path}: give SWEEP=experiments/sweeps/<name>.yaml")
        spec = yaml.safe_load(path.read_text()) or {}
        unknown = set(spec) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        for key in ("configs", "metric"):
            if key not in spec:
                raise ValueError(f"{path}: missing '{key}'")
        if (spec.get("grid") is None) == (spec.get("random") is None):
            raise ValueError(f"{path}: give exactly one of 'grid' or 'random'")
        if spec.get("mode", "min") not in ("min", "max"):
            raise ValueError(f"{path}: mode must be min or max, got {spec['mode']!r}")
        return cls(**{"name": path.stem, **spec})

    @property
    def root(self) -> Path:
        return Path(self.save_dir) / self.name

    def run_dir(self, version: str) -> Path:
        """SAVE_DIR/NAME/<version>, checked to be a folder directly inside SAVE_DIR/NAME."""
        path = self.root / version
        if path.resolve().parent != self.root.resolve():
            raise ValueError(f"sweep {self.name}: run folder {path} is not inside {self.root}")
        return path

    def points(self) -> list[dict]:
        """The swept values of every run, in order."""
        if self.grid is not None:
            keys = list(self.grid)
            return [dict(zip(keys, vals)) for vals in itertools.product(*(self.grid[k] for k in keys))]
        n, seed, space = self.random["n"], self.random.get("seed", 0), self.random["space"]
        rng = random.Random(seed)
        return [{k: _sample(rng, k, dist) for k, dist in space.items()} for _ in range(n)]

    def runs(self) -> list[Run]:
        runs, seen = [], set()
        for i, params in enumerate(self.points()):
            version = safe_version(",".join(f"{self.short.get(k, k.rsplit('.', 1)[-1])}={_short(v)}"
                                            for k, v in params.items()))
            if version in seen:  # random search drew the same point again
                version = safe_version(f"{version},run={i}")
            seen.add(version)
            self.run_dir(version)
            args = [self.command] + config_args(self.configs)
            for k, v in {**self.fixed, **params}.items():
                v = v.format(version=version, name=self.name, save_dir=self.save_dir) if isinstance(v, str) else v
                args += [f"--{k}", _cli_value(v)]
            args += ["--trainer.logger.init_args.save_dir", self.save_dir, "--trainer.logger.init_args.name", self.name,
                     "--trainer.logger.init_args.version", version,
                     "--trainer.logger.init_args.default_hp_metric", "false"]  # the sweep writes the hparams event
            runs.append(Run(version, params, args))
        return runs


def _sample(rng: random.Random, key: str, dist):
    if isinstance(dist, list):
        return rng.choice(dist)
    if isinstance(dist, dict) and len(dist) == 1:
        (kind, (lo, hi)), = dist.items()
        if kind == "uniform":
            return rng.uniform(lo, hi)
        if kind == "log_uniform":
            return math.exp(rng.uniform(math.log(lo), math.log(hi)))
        if kind == "int_uniform":
            return rng.randint(lo, hi)
    raise ValueError(f"random.space.{key}: a list of choices or one of {{uniform|log_uniform|int_uniform: [lo, hi]}}, "
                     f"got {dist!r}")


def _short(v) -> str:
    """Compact value for a version name: 0.0001 -> 1e-4, 0.25 -> 0.25, 32 -> 32."""
    if isinstance(v, float) and v != 0 and not 1e-3 <= abs(v) < 1e5:
        mantissa, exp = f"{v:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v) if not isinstance(v, (list, dict)) else json.dumps(v, separators=(",", ":"))


def _cli_value(v) -> str:
    if isinstance(v, (list, dict, bool)) or v is None:
        return json.dumps(v)
    return str(v)


def _python_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", launch.CLI_MODULE, *args]


def final_metric(logdir: Path, tag: str) -> tuple[float | None, int | None]:
    """(last value, its step) of a scalar in a run's event files, or (None, None) if it never logged it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    ea.Reload()
    if tag not in ea.Tags().get("scalars", []):
        return None, None
    last = max(ea.Scalars(tag), key=lambda e: (e.step, e.wall_time))
    return float(last.value), int(last.step)


def record_run(sweep: Sweep, run: Run, returncode: int | None = None) -> dict:
    """Read a finished run's metric, log hparams + metric to its TensorBoard version, write sweep_run.json."""
    from lightning.pytorch.loggers import TensorBoardLogger

    logdir = sweep.run_dir(run.version)
    done = finished(sweep, run)
    if done is not None:
        return done
    value, step = final_metric(logdir, sweep.metric) if logdir.is_dir() else (None, None)
    status = "ok" if value is not None and returncode in (0, None) else (
        f"failed (exit {returncode})" if returncode not in (0, None) else f"no {sweep.metric} logged")
    rec = {"version": run.version, "params": run.params, "metric": sweep.metric, "value": value, "step": step,
           "status": status, "command": " ".join(_python_cmd(run.args))}
    if value is not None:
        logger = TensorBoardLogger(sweep.save_dir, name=sweep.name, version=run.version, default_hp_metric=False)
        logger.log_hyperparams(run.params, {sweep.metric: value}, step=step)  # same value, same step as the curve's end
        logger.finalize("success")
        atomic_write_json(logdir / RECORD, rec)  # only complete runs are marked: failed ones run again
    return rec


def finished(sweep: Sweep, run: Run) -> dict | None:
    """The run's record if it finished before (a cut or unreadable record counts as not finished)."""
    rec = read_json(sweep.run_dir(run.version) / RECORD)
    return rec if isinstance(rec, dict) else None


def run_sequential(sweep: Sweep, runs: list[Run], in_process: bool = False) -> None:
    """One run after another on this machine; finished runs are skipped."""
    for i, run in enumerate(runs, 1):
        if finished(sweep, run) is not None:
            print(f"[sweep] {i}/{len(runs)} {run.version}: done before, skipped", flush=True)
            run.result = record_run(sweep, run)
            continue
        print(f"[sweep] {i}/{len(runs)} {run.version}", flush=True)
        if in_process:  # one interpreter for every run: for tiny sweeps and tests
            from lightning_modules.cli import main as cli_main

            try:
                cli_main(run.args)
                rc = 0
            except (Exception, SystemExit) as e:  # a failed run is recorded, the sweep goes on
                print(f"[sweep] {run.version} failed: {e!r}", flush=True)
                rc = 1
        else:
            rc = subprocess.call(_python_cmd(run.args))
        run.result = record_run(sweep, run, rc)


def summarize(sweep: Sweep, runs: list[Run]) -> dict:
    """Rank the runs by the metric; write summary.{md,json} into SAVE_DIR/NAME."""
    for run in runs:
        if not run.result:
            run.result = record_run(sweep, run)
    sign = 1.0 if sweep.mode == "min" else -1.0
    ranked = sorted(runs, key=lambda r: (r.result["value"] is None, sign * (r.result["value"] or 0.0)))
    rows = [{"rank": i + 1 if r.result["value"] is not None else None, **r.result} for i, r in enumerate(ranked)]
    summary = {"sweep": sweep.name, "metric": sweep.metric, "mode": sweep.mode, "configs": sweep.configs, "runs": rows}
    keys = list(runs[0].params) if runs else []
    md = [f"# Sweep {sweep.name}: {sweep.metric} ({sweep.mode}), {len(rows)} runs", "",
          "| rank | version | " + " | ".join(keys) + f" | {sweep.metric} | step | status |",
          "|---" * (len(keys) + 5) + "|"]
    for row in rows:
        val = "n/a" if row["value"] is None else f"{row['value']:.6g}"
        md.append(f"| {row['rank'] or '-'} | {row['version']} | " + " | ".join(str(row["params"][k]) for k in keys)
                  + f" | {val} | {row['step'] if row['step'] is not None else '-'} | {row['status']} |")
    atomic_write_json(sweep.root / "summary.json", summary)
    atomic_write_text(sweep.root / "summary.md", "\n".join(md) + "\n")
    summary["markdown"] = "\n".join(md) + "\n"
    return summary


def array_script(sweep: Sweep, runs: list[Run], world: launch.World, **slurm) -> str:
    """A SLURM array job: task i runs run i (with the world overrides, through srun)."""
    tasks = [[launch.Stage(f"run{i}", _python_cmd(r.args))] for i, r in enumerate(runs)]
    return launch.slurm_script([], world, array=tasks, **slurm)


def main(argv: list[str] | None = None) -> dict | str | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sweep", help="experiments/sweeps/<name>.yaml")
    p.add_argument("--dry-run", action="store_true", help="print the commands (or the array script); run nothing")
    p.add_argument("--summarize", action="store_true", help="only read the runs' metrics and write the summary")
    p.add_argument("--in-process", action="store_true", help="run every run in this interpreter (tiny sweeps)")
    g = p.add_argument_group("SLURM array (one task per run)")
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
        runs = sweep.runs()
    except ValueError as e:  # a malformed sweep file: say what, no traceback
        raise SystemExit(f"sweep: {e}") from None
    if a.slurm:
        script = array_script(sweep, runs, launch.World(a.nodes, a.gpus_per_node), job_name=f"sweep-{sweep.name}",
                              partition=a.partition, time=a.time, output=f"{a.dir}/%x-%A_%a.out", run_dir=a.dir)
        if a.dry_run:
            print(script, end="")
            return script
        Path(a.dir).mkdir(parents=True, exist_ok=True)
        job = launch.submit(script, Path(a.dir) / f"sweep-{sweep.name}.sbatch", a.sbatch)
        print(f"submitted {len(runs)} runs as SLURM array job {job}; when it is done: "
              f"python -m instaflow.tools.sweep {a.sweep} --summarize")
        return job
    if a.dry_run:
        print("\n".join(launch._join(_python_cmd(r.args)) for r in runs))
        return None
    if not a.summarize:
        run_sequential(sweep, runs, in_process=a.in_process)
    summary = summarize(sweep, runs)
    print(summary["markdown"], end="")
    print(f"[sweep] summary: {sweep.root / 'summary.md'}, {sweep.root / 'summary.json'}")
    return summary


if __name__ == "__main__":
    out = main()
    # a failed run fails `make sweep` (after the summary is written); printing or submitting succeeds
    sys.exit(1 if isinstance(out, dict) and any(r["status"] != "ok" for r in out["runs"]) else 0)
