"""Sweeps: a 2x2 grid of tiny reflow runs -> four TensorBoard versions with hparams + metric, a ranked table."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT
from tests.lightning_modules.test_chain import gen_pairs, tiny_yaml

SWEEPS = sorted((ROOT / "experiments" / "sweeps").glob("*.yaml"))


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


def _count(logdir: Path, tag: str) -> int:
    """How many summaries named ``tag`` the run's event files hold."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return sum(v.tag == tag for f in logdir.glob("events.out.tfevents.*") for e in EventFileLoader(str(f)).Load()
               for v in e.summary.value)


def tiny_sweep(tmp_path: Path, tiny_world, tiny_sd_folder) -> Path:
    """experiments/sweeps/tiny.yaml pointed at a tiny reflow experiment and a temporary save_dir."""
    pairs = tmp_path / "pairs"
    gen_pairs(tmp_path, tiny_world, str(tiny_sd_folder), pairs)
    exp = tiny_yaml("reflow.yaml", tmp_path, {"init": str(tiny_sd_folder), "warmup_steps": 1, "grid_steps": [1]},
                    {"train": str(pairs), "val": str(pairs), "num_workers": 0, "shuffle_buffer": 16})
    spec = yaml.safe_load((ROOT / "experiments" / "sweeps" / "tiny.yaml").read_text())
    spec["configs"] = [str(ROOT / "experiments" / "base" / "default.yaml"), exp]
    spec["save_dir"] = str(tmp_path / "sweeps")
    out = tmp_path / "tiny.yaml"
    out.write_text(yaml.safe_dump(spec, sort_keys=False))  # the grid's order names the versions
    return out


def test_two_by_two_sweep_writes_four_tensorboard_runs_with_hparams_and_a_ranked_table(tiny_world, tiny_sd_folder,
                                                                                     tmp_path, capsys):
    from instaflow.tools import sweep

    path = tiny_sweep(tmp_path, tiny_world, tiny_sd_folder)
    summary = sweep.main([str(path), "--in-process"])
    root = tmp_path / "sweeps" / "tiny"
    versions = {"lr=1e-4,bs=4", "lr=1e-4,bs=8", "lr=0.01,bs=4", "lr=0.01,bs=8"}
    assert {p.name for p in root.iterdir() if p.is_dir()} == versions
    finals = {}
    for v in versions:
        logdir = root / v
        assert list(logdir.glob("events.out.tfevents.*"))
        ea = _events(logdir)
        loss = [(e.step, e.value) for e in ea.Scalars("val/loss")]
        # two validations (after steps 2 and 4, logged at global steps 1 and 3) and the hparams call's copy of the last
        assert [st for st, _ in loss] == [1, 3, 3] and loss[-1][1] == loss[-2][1] and np.isfinite([x for _, x in loss]).all()
        finals[v] = loss[-1][1]
        params, metrics = _hparams(ea)
        lr, bs = v.split(",")
        assert params["model.init_args.lr"] == pytest.approx(float(lr[3:]))
        assert params["data.init_args.batch_size"] == int(bs[3:])
        assert metrics == ["val/loss"]  # the HParams tab's metric column reads this scalar
        assert _count(logdir, "_hparams_/session_start_info") == 1  # one session: Lightning's own call wrote none
        assert "hp_metric" not in ea.Tags()["scalars"]  # default_hp_metric off: one hparams session per run
        assert {"throughput/samples_per_s", "throughput/mfu"} <= set(ea.Tags()["scalars"])  # the sweep's callback
        assert (logdir / "model" / "model_index.json").exists()  # each run exported to its own folder
    # the summary ranks the four runs by their last val/loss, lowest first
    saved = json.loads((root / "summary.json").read_text())
    rows = saved["runs"]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4] and {r["version"] for r in rows} == versions
    assert [r["value"] for r in rows] == sorted(finals.values())
    assert all(r["value"] == pytest.approx(finals[r["version"]]) and r["status"] == "ok" for r in rows)
    md = (root / "summary.md").read_text().splitlines()
    assert md[2].startswith("| rank | version | model.init_args.lr | data.init_args.batch_size | val/loss |")
    assert [line.split(" | ")[1] for line in md[4:]] == [r["version"] for r in rows]
    assert summary["runs"] == rows
    # a second call finds every run finished and only rewrites the summary
    capsys.readouterr()
    sweep.main([str(path), "--in-process"])
    assert capsys.readouterr().out.count("done before, skipped") == 4
    assert json.loads((root / "summary.json").read_text())["runs"] == rows


def test_failed_run_is_reported_not_ranked_and_runs_again(tmp_path):
    from instaflow.tools import sweep

    spec = {"configs": [str(ROOT / "experiments" / "base" / "default.yaml")], "metric": "val/loss",
            "save_dir": str(tmp_path), "random": {"n": 3, "seed": 1, "space": {
                "model.init_args.lr": {"log_uniform": [1e-5, 1e-3]}, "data.init_args.batch_size": [4, 8]}}}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(spec))
    s = sweep.Sweep.load(path)
    runs = s.runs()
    assert len(runs) == 3 and runs[0].params == s.points()[0]  # seeded: the same points every time
    assert all(1e-5 <= r.params["model.init_args.lr"] <= 1e-3 and r.params["data.init_args.batch_size"] in (4, 8)
               for r in runs)
    summary = sweep.main([str(path), "--in-process"])  # no model in the config: every run fails at parse time
    assert [r["rank"] for r in summary["runs"]] == [None] * 3
    assert all(r["status"].startswith("failed") for r in summary["runs"])
    assert not list(tmp_path.rglob(sweep.RECORD))  # not marked finished: a rerun tries again


def test_sweep_as_a_slurm_array(tmp_path, monkeypatch, capsys):
    """--slurm --dry-run prints one array task per run; array task 2 runs run 2 through srun."""
    from instaflow.tools import sweep

    out = sweep.main([str(ROOT / "experiments" / "sweeps" / "reflow_lr.yaml"), "--slurm", "--nodes", "1",
                      "--gpus-per-node", "4", "--partition", "gpu", "--dry-run"])
    assert "#SBATCH --array=0-3" in out and "#SBATCH --output=runs/slurm/%x-%A_%a.out" in out
    assert "#SBATCH --job-name=sweep-reflow_lr" in out and "#SBATCH --signal=SIGUSR1@90" in out
    assert out.count("srun --kill-on-bad-exit=1 --nodes=1 --ntasks-per-node=4") == 4
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/bash\necho "$@" > {tmp_path}/srun_call\n')
    (bin_dir / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "60",
           "SLURM_ARRAY_JOB_ID": "55", "SLURM_ARRAY_TASK_ID": "2"}
    subprocess.run(["bash", "-c", out.replace(f"cd {os.getcwd()}", f"cd {tmp_path}")], env=env, check=True)
    call = (tmp_path / "srun_call").read_text()
    assert "--trainer.logger.init_args.version lr=3e-4,bs=32 " in call and "--model.init_args.lr 0.0003 " in call
    assert call.rstrip().endswith("--trainer.num_nodes 1 --trainer.devices 4 --trainer.default_root_dir "
                                  "runs/slurm/55_2/run2")


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_committed_sweeps_parse_with_their_overrides(path, tmp_path):
    """Every run's dotted keys exist: LightningCLI parses and instantiates the first and last run of each sweep."""
    from instaflow.tools import sweep
    from lightning_modules.cli import main

    s = sweep.Sweep.load(path)
    s.save_dir = str(tmp_path)
    runs = s.runs()
    assert len(runs) == 4 and len({r.version for r in runs}) == 4
    for run in (runs[0], runs[-1]):
        c = main([str(ROOT / a) if a.startswith("experiments/") else a for a in run.args[1:]], run=False)
        assert c.trainer.logger.log_dir == str(tmp_path / s.name / run.version)
        assert any(type(cb).__name__ == "Throughput" for cb in c.trainer.callbacks)
        for key, value in run.params.items():
            section, _, attr = key.split(".")
            assert c.config[section]["init_args"][attr] == value


def test_make_sweep_calls_the_sweep_entry(tmp_path):
    from tests.tools.test_make_values import make_calls

    local, = make_calls(tmp_path, "sweep", "SWEEP=experiments/sweeps/reflow_lr.yaml")
    assert local == ["-m", "instaflow.tools.sweep", "experiments/sweeps/reflow_lr.yaml"]
    slurm, = make_calls(tmp_path, "sweep", "SWEEP=experiments/sweeps/reflow_lr.yaml", "NODES=2", "GPUS_PER_NODE=8",
                        "PARTITION=gpu", "DRY_RUN=1")
    assert slurm[3:9] == ["--slurm", "--nodes", "2", "--gpus-per-node", "8", "--dir"]
    assert slurm[-3:] == ["--partition", "gpu", "--dry-run"]
    missing = subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/.installed", "sweep"], cwd=ROOT,
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "SWEEP=experiments/sweeps/<name>.yaml" in missing.stderr
