"""Sweep files, their checks, the trials' commands, the SLURM array of workers, the report, and a real tiny sweep.

The worker machinery (many workers, killed workers, storages) is in test_sweep_workers.py, pruning on two ranks in
test_sweep_prune.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT
from tests.lightning_modules.test_chain import gen_pairs, tiny_yaml

SWEEPS = sorted((ROOT / "experiments" / "sweeps").glob("*.yaml"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def calls(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]


def write(tmp_path: Path, spec: dict, name: str = "s") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def base_spec(tmp_path: Path, **extra) -> dict:
    return {"configs": ["experiments/base/default.yaml"], "metric": "val/loss", "save_dir": str(tmp_path / "save"),
            "space": {"model.init_args.lr": {"log_uniform": [1e-5, 1e-3]}}, "n_trials": 2, **extra}


BAD = [  # (change to a valid file, the words the error must hold)
    ({"metrc": "val/loss"}, "unknown key 'metrc'"),
    ({"mode": "lowest"}, "'mode': min or max"),
    ({"grid": {"a.b": [1]}}, "exactly one of 'grid' or 'space'"),
    ({"n_trials": 0}, "'n_trials': a positive number"),
    ({"space": {"model.init_args.lr": {"loguniform": [1e-5, 1e-3]}}}, "'space.model.init_args.lr'"),
    ({"space": {"model.init_args.lr": {"log_uniform": [0, 1e-3]}}}, "'space.model.init_args.lr.log_uniform': a log"),
    ({"space": {"data.init_args.batch_size": {"int": [64, 16]}}}, "'space.data.init_args.batch_size.int': [low, high]"),
    ({"sampler": "cmaes"}, "'sampler.name': one of grid|random|tpe"),
    ({"sampler": "grid"}, "'sampler': 'grid' with a space"),
    ({"sampler": {"name": "tpe", "n_startup": 3}}, "'sampler.n_startup': not an argument of TPESampler"),
    ({"pruner": "asha"}, "'pruner.name': one of none|median|successive_halving|hyperband"),
    ({"pruner": {"name": "successive_halving", "min_resources": 2}},
     "'pruner.min_resources': not an argument of SuccessiveHalvingPruner"),
    ({"heartbeat": {"interval": 1, "grace_s": 3}}, "'heartbeat.grace_s': unknown"),
    ({"storage": "redis://host/0"}, "'storage': sqlite:///path.db"),
]


@pytest.mark.parametrize("change,words", BAD, ids=[w.split(":")[0] for _, w in BAD])
def test_a_bad_sweep_key_fails_naming_it(change, words, tmp_path):
    from instaflow.tools import sweep

    spec = base_spec(tmp_path, **change)
    if "grid" in change:
        spec["n_trials"] = None
    path = write(tmp_path, {k: v for k, v in spec.items() if v is not None})
    with pytest.raises(SystemExit, match="sweep: .*" + re.escape(words)):
        sweep.main([str(path), "--dry-run"])


def test_the_old_random_form_is_a_random_sampler_and_a_grid_is_a_grid_sampler(tmp_path):
    import optuna

    from instaflow.tools.sweep import Sweep

    old = Sweep.load(write(tmp_path, {"configs": ["x.yaml"], "metric": "val/loss", "random": {
        "n": 3, "seed": 1, "space": {"model.init_args.lr": {"log_uniform": [1e-5, 1e-3]}, "b": [4, 8]}}}))
    assert old.n_trials == 3 and old.sampler == {"name": "random", "seed": 1}
    assert isinstance(old.sampler_obj(), optuna.samplers.RandomSampler)
    dists = old.distributions()
    assert dists["model.init_args.lr"].log and dists["b"].choices == (4, 8)
    grid = Sweep.load(ROOT / "experiments" / "sweeps" / "reflow_lr.yaml")
    assert isinstance(grid.sampler_obj(), optuna.samplers.GridSampler) and len(grid.points()) == 4
    assert isinstance(grid.pruner_obj(), optuna.pruners.NopPruner)
    assert grid.storage_url == "sqlite:///runs/sweeps/reflow_lr/study.db"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_committed_sweeps_parse_with_their_overrides(path, tmp_path):
    """Every trial's dotted keys exist: LightningCLI parses and instantiates the first and last point of each
    sweep, with the sweep's logger folder and its OptunaTrial callback."""
    from instaflow.tools import sweep
    from lightning_modules.cli import main

    s = sweep.Sweep.load(path)
    s.save_dir = str(tmp_path)
    points = s.points()
    assert len(points) == 4
    for i in (0, len(points) - 1):
        version = s.version(i, points[i])
        args = s.args(version, points[i])
        c = main([str(ROOT / a) if a.startswith("experiments/") else a for a in args[1:]], run=False)
        assert c.trainer.logger.log_dir == str(tmp_path / s.name / version)
        names = [type(cb).__name__ for cb in c.trainer.callbacks]
        assert "Throughput" in names and "OptunaTrial" in names
        for key, value in points[i].items():
            section, _, attr = key.split(".")
            assert c.config[section]["init_args"][attr] == value


def test_dry_run_prints_each_grid_trial_command(capsys):
    from instaflow.tools import sweep

    out = sweep.main([str(ROOT / "experiments" / "sweeps" / "reflow_lr.yaml"), "--dry-run"])
    lines = out.splitlines()
    assert len(lines) == 4 and all(" -m lightning_modules.cli fit -c " in line for line in lines)
    assert "--trainer.logger.init_args.version 000-lr=1e-4,bs=32 " in lines[0]
    assert "--model.init_args.lr 0.0003 --data.init_args.batch_size 64 " in lines[3]
    assert lines[0].endswith("--trainer.callbacks+ callbacks.optuna_trial.OptunaTrial")


def test_sweep_as_a_slurm_array_of_workers(tmp_path):
    """--slurm --dry-run prints one worker per array task; run as task 1 (srun a stand-in that runs the trial here),
    the worker runs every queued trial over the allocation, each with the world's overrides."""
    from instaflow.tools import sweep

    script = sweep.main([str(ROOT / "experiments" / "sweeps" / "reflow_lr.yaml"), "--slurm", "--nodes", "1",
                         "--gpus-per-node", "4", "--partition", "gpu", "--dry-run"])
    assert "#SBATCH --array=0-3" in script and "#SBATCH --output=runs/slurm/%x-%A_%a.out" in script
    assert "#SBATCH --job-name=sweep-reflow_lr" in script and "#SBATCH --signal=SIGUSR1@90" in script
    assert script.count(f"-m instaflow.tools.sweep {ROOT}/experiments/sweeps/reflow_lr.yaml --worker --storage "
                        "sqlite:///runs/sweeps/reflow_lr/study.db --launcher srun --nodes 1 --gpus-per-node 4") == 4

    spec = {"configs": ["experiments/base/default.yaml"], "metric": "val/loss", "entry": "tests.tools.sweep_standin",
            "save_dir": str(tmp_path / "save"), "grid": {"x": [0.1, 0.5]}, "storage": f"sqlite:///{tmp_path}/s.db",
            "fixed": {"steps": 2, "log": str(tmp_path / "calls.jsonl")}}
    path = write(tmp_path, spec, "arr")
    script = sweep.main([str(path), "--slurm", "--gpus-per-node", "4", "--workers", "2", "--dry-run",
                         "--dir", str(tmp_path / "slurm")])
    assert "#SBATCH --array=0-1" in script
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"  # records its arguments, then runs the command after its own options (one task here)
    srun.write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/srun_calls\nwhile [[ "$1" == --* ]]; do shift; done\n'
                    'exec "$@"\n')
    srun.chmod(0o755)
    env = {**ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "60",
           "SLURM_ARRAY_JOB_ID": "55", "SLURM_ARRAY_TASK_ID": "1"}
    out = subprocess.run(["bash", "-c", script.replace(f"cd {os.getcwd()}", f"cd {ROOT}")], env=env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    srun_calls = (tmp_path / "srun_calls").read_text().splitlines()
    assert len(srun_calls) == 2 and all(c.startswith("--kill-on-bad-exit=1 --nodes=1 --ntasks-per-node=4 ")
                                        and c.endswith("--trainer.num_nodes 1 --trainer.devices 4") for c in srun_calls)
    study = sweep.open_study(sweep.Sweep.load(path), create=False)
    assert sorted(t.params["x"] for t in study.get_trials()) == [0.1, 0.5]
    assert all(t.state.name == "COMPLETE" for t in study.get_trials())


def test_report_ranks_trials_draws_the_plots_and_names_the_dashboard(tmp_path):
    """A space sweep with a median pruner on the stand-in: the table ranks COMPLETE then PRUNED by value, with
    states and steps; the three PNGs are written (importances only once 2 trials finished)."""
    from instaflow.tools import sweep

    spec = {"configs": ["experiments/base/default.yaml"], "metric": "val/loss", "entry": "tests.tools.sweep_standin",
            "save_dir": str(tmp_path / "save"), "space": {"x": {"uniform": [0.0, 2.0]}}, "n_trials": 5,
            "sampler": {"name": "random", "seed": 3}, "pruner": {"name": "median", "n_startup_trials": 1},
            "storage": f"journal://{tmp_path}/study.log", "fixed": {"steps": 4, "log": str(tmp_path / "calls.jsonl")}}
    path = write(tmp_path, spec, "rep")
    out = subprocess.run([sys.executable, "-m", "instaflow.tools.sweep", str(path)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    root = tmp_path / "save" / "rep"
    summary = sweep.main([str(path), "--report"])
    rows = summary["trials"]
    assert len(rows) == 5 and {r["state"] for r in rows} <= {"COMPLETE", "PRUNED"}
    states = [r["state"] for r in rows]
    assert "PRUNED" in states and states == sorted(states)  # COMPLETE ones first
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    assert [r["value"] for r in complete] == sorted(r["value"] for r in complete)
    assert all(r["steps"] == 4 for r in complete) and all(r["steps"] < 4 for r in rows if r["state"] == "PRUNED")
    for name in ("history", "importances", "intermediate"):
        png = root / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    md = (root / "summary.md").read_text().splitlines()
    assert md[2] == "| rank | trial | x | val/loss | state | steps | run |"
    assert md[4].startswith(f"| 1 | {rows[0]['trial']} | ")
    assert json.loads((root / "summary.json").read_text())["trials"] == rows
    assert f"optuna-dashboard {tmp_path}/study.log" in out.stdout

    one = write(tmp_path, {**spec, "n_trials": 1, "study": "one"}, "one")
    subprocess.run([sys.executable, "-m", "instaflow.tools.sweep", str(one)], cwd=ROOT, env=ENV, check=True,
                   capture_output=True, timeout=240)
    assert "importances need 2 finished trials" in sweep.main([str(one), "--report"])["plots"]["importances"]


def test_a_rerun_resumes_the_study_retries_failed_trials_when_asked_and_refuses_a_changed_space(tmp_path):
    from instaflow.tools import sweep

    spec = {"configs": ["experiments/base/default.yaml"], "metric": "val/loss", "entry": "tests.tools.sweep_standin",
            "save_dir": str(tmp_path / "save"), "grid": {"x": [0.1, 0.2]}, "storage": f"sqlite:///{tmp_path}/s.db",
            "fixed": {"steps": 2, "fail_at": 2, "fail_x": 0.2, "log": str(tmp_path / "calls.jsonl")}}
    path = write(tmp_path, spec)
    s = sweep.Sweep.load(path)
    study = sweep.open_study(s)
    assert [t.state.name for t in study.get_trials()] == ["WAITING", "WAITING"]
    again = sweep.open_study(s)  # a second command: the same study, nothing queued twice
    assert len(again.get_trials()) == 2
    cmd = [sys.executable, "-m", "instaflow.tools.sweep", str(path)]
    first = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert first.returncode == 1  # a failed trial fails the command, after the table
    assert "| - | 1 | 0.2 | n/a | FAIL (exit 3) | 1 | 001-x=0.2 |" in first.stdout
    rerun = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert len(calls(tmp_path)) == 2 and rerun.returncode == 1  # nothing left to run: nothing ran
    subprocess.run(cmd + ["--retry-failed"], cwd=ROOT, env=ENV, capture_output=True, timeout=120)
    trials = sweep.open_study(s, create=False).get_trials()
    assert [(t.number, t.state.name) for t in trials] == [(0, "COMPLETE"), (1, "FAIL"), (2, "FAIL")]
    assert trials[2].system_attrs["failed_trial"] == 1 and trials[2].user_attrs["version"] == "001-x=0.2"
    assert [c["x"] for c in calls(tmp_path)] == [0.1, 0.2, 0.2]
    write(tmp_path, {**spec, "grid": {"x": [0.1, 0.3]}})
    with pytest.raises(SystemExit, match="was made for another search space or metric"):
        sweep.main([str(path)])


def tiny_sweep(tmp_path: Path, tiny_world, tiny_sd_folder) -> Path:
    """experiments/sweeps/tiny.yaml pointed at a tiny reflow experiment and a temporary save_dir."""
    pairs = tmp_path / "pairs"
    gen_pairs(tmp_path, tiny_world, str(tiny_sd_folder), pairs)
    exp = tiny_yaml("reflow.yaml", tmp_path, {"init": str(tiny_sd_folder), "warmup_steps": 1, "grid_steps": [1]},
                    {"train": str(pairs), "val": str(pairs), "num_workers": 0, "shuffle_buffer": 16})
    spec = yaml.safe_load((ROOT / "experiments" / "sweeps" / "tiny.yaml").read_text())
    spec["configs"] = [str(ROOT / "experiments" / "base" / "default.yaml"), exp]
    spec["save_dir"] = str(tmp_path / "sweeps")
    spec["grid"]["data.init_args.batch_size"] = [4]  # 2 trials: the machinery, not the grid, is under test
    return write(tmp_path, spec, "tiny")


def _events(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def _hparams(ea) -> tuple[dict, list[str]]:
    """(hparams of the run's session, metric tags of its experiment) from TensorBoard's hparams plugin data."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    def content(tag):
        return plugin_data_pb2.HParamsPluginData.FromString(ea.SummaryMetadata(tag).plugin_data.content)

    start = content("_hparams_/session_start_info").session_start_info
    exp = content("_hparams_/experiment").experiment
    values = {k: (v.number_value if v.HasField("number_value") else v.string_value) for k, v in start.hparams.items()}
    return values, [m.name.tag for m in exp.metric_infos]


def test_a_tiny_reflow_sweep_reports_every_validation_and_writes_hparams(tiny_world, tiny_sd_folder, tmp_path):
    """Two real trials (LightningCLI fits of tiny reflow): the study holds each validation's val/loss, the
    objective is the last, and each TensorBoard run has its HParams session with that value."""
    from instaflow.tools import sweep

    path = tiny_sweep(tmp_path, tiny_world, tiny_sd_folder)
    out = subprocess.run([sys.executable, "-m", "instaflow.tools.sweep", str(path)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    study = sweep.open_study(sweep.Sweep.load(path), create=False)
    root = tmp_path / "sweeps" / "tiny"
    assert {p.name for p in root.iterdir() if p.is_dir()} == {"000-lr=1e-4,bs=4", "001-lr=0.01,bs=4"}
    for t in study.get_trials():
        assert t.state.name == "COMPLETE" and sorted(t.intermediate_values) == [2, 4]  # after steps 2 and 4
        assert t.value == t.intermediate_values[4]
        ea = _events(root / t.user_attrs["version"])
        loss = [(e.step, e.value) for e in ea.Scalars("val/loss")]
        # the two validations (logged at global steps 1 and 3) and the hparams call's copy of the last
        assert [st for st, _ in loss] == [1, 3, 3] and np.isfinite([x for _, x in loss]).all()
        assert loss[-1][1] == pytest.approx(t.value) and loss[1][1] == pytest.approx(t.intermediate_values[4])
        params, metrics = _hparams(ea)
        assert params["model.init_args.lr"] == pytest.approx(t.params["model.init_args.lr"])
        assert metrics == ["val/loss"] and "hp_metric" not in ea.Tags()["scalars"]
        assert (root / t.user_attrs["version"] / "model" / "model_index.json").exists()  # its own export
    assert [r["rank"] for r in json.loads((root / "summary.json").read_text())["trials"]] == [1, 2]


def test_make_sweep_and_sweep_report_call_the_sweep_entry(tmp_path):
    from tests.tools.test_make_values import make_calls

    local, = make_calls(tmp_path, "sweep", "SWEEP=experiments/sweeps/reflow_lr.yaml")
    assert local == ["-m", "instaflow.tools.sweep", "experiments/sweeps/reflow_lr.yaml"]
    workers, = make_calls(tmp_path, "sweep", "SWEEP=experiments/sweeps/reflow_lr.yaml", "WORKERS=3")
    assert workers[3:] == ["--workers", "3"]
    slurm, = make_calls(tmp_path, "sweep", "SWEEP=experiments/sweeps/reflow_lr.yaml", "NODES=2", "GPUS_PER_NODE=8",
                        "PARTITION=gpu", "DRY_RUN=1")
    assert slurm[3:9] == ["--slurm", "--nodes", "2", "--gpus-per-node", "8", "--dir"]
    assert slurm[-3:] == ["--partition", "gpu", "--dry-run"]
    report, = make_calls(tmp_path, "sweep-report", "SWEEP=experiments/sweeps/reflow_lr.yaml")
    assert report == ["-m", "instaflow.tools.sweep", "experiments/sweeps/reflow_lr.yaml", "--report"]
    for target in ("sweep", "sweep-report"):
        missing = subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/.installed", target], cwd=ROOT,
                                 capture_output=True, text=True)
        assert missing.returncode != 0 and "SWEEP=experiments/sweeps/<name>.yaml" in missing.stderr
