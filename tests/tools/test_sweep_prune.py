"""A pruned trial of a 2-rank run: both ranks stop at the same validation (rank 0's decision, broadcast), the fit
ends cleanly with its checkpoint, and the study records the trial PRUNED at that step.

The worker starts the trial with ``--launcher torchrun --gpus-per-node 2`` (2 gloo processes on CPU); the run is
``tests/tools/sweep_rank_trial.py``, a real Lightning DDP fit with the real ``OptunaTrial`` callback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT


def test_a_pruned_two_rank_trial_stops_at_its_validation_on_every_rank_and_is_recorded_pruned(tmp_path):
    import optuna
    from optuna.trial import TrialState

    from instaflow.tools.sweep import Sweep, open_study

    spec = {"configs": ["experiments/base/default.yaml"], "metric": "val/loss", "entry": "tests.tools.sweep_rank_trial",
            "save_dir": str(tmp_path / "save"), "grid": {"x": [2.0, 0.3]}, "storage": f"sqlite:///{tmp_path}/study.db",
            "pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
            "fixed": {"root": str(tmp_path / "run")}}
    path = tmp_path / "prune.yaml"
    path.write_text(yaml.safe_dump(spec))
    sweep = Sweep.load(path)
    study = open_study(sweep)  # made and queued here, so that the good trial can finish first, as the median
    good = next(t for t in study.get_trials(states=(TrialState.WAITING,)) if t.system_attrs["fixed_params"]["x"] == 0.3)
    assert study._storage.set_trial_state_values(good._trial_id, state=TrialState.RUNNING)
    trial = optuna.Trial(study, good._trial_id)
    trial.suggest_categorical("x", [2.0, 0.3])
    for step in (2, 4, 6, 8):
        trial.report((0.3 - 0.3) ** 2 + 1 / step, step)
    study.tell(trial, 0.125)
    out = subprocess.run([sys.executable, "-m", "instaflow.tools.sweep", str(path), "--worker", "--launcher",
                          "torchrun", "--gpus-per-node", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stdout + out.stderr
    # both ranks left fit() after the first validation (step 2 of 8), none hung in a collective
    assert "RANK 0 STOPPED AT STEP 2" in out.stdout and "RANK 1 STOPPED AT STEP 2" in out.stdout, out.stdout
    trial = study.get_trials()[0]  # x = 2.0, the worker's only trial
    assert trial.params == {"x": 2.0} and trial.state == TrialState.PRUNED
    assert trial.intermediate_values == {2: pytest.approx(1.7 ** 2 + 0.5)} and trial.user_attrs["pruned_step"] == 2
    assert trial.value == pytest.approx(1.7 ** 2 + 0.5) and trial.user_attrs["returncode"] == 0
    ckpts = sorted(p.name for p in (tmp_path / "run" / "ckpt").iterdir())
    assert ckpts == ["epoch=0-step=2.ckpt", "last.ckpt"]  # the stop is a clean end: the checkpoint is written
