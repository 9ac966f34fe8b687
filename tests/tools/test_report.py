"""The run record reads each training run's seeds from the config that run saved."""

from __future__ import annotations

import yaml

from instaflow.tools.report import training_seeds


def test_training_seeds_come_from_the_newest_saved_config(tmp_path):
    for version, seed in ((0, 3), (1, 7)):  # version_1 is the run that counts (a rerun)
        d = tmp_path / "reflow" / f"version_{version}"
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump({
            "seed_everything": seed, "model": {"class_path": "x", "init_args": {"seed": seed + 1}},
            "data": {"class_path": "y", "init_args": {"seed": seed + 2}}}))
    got = training_seeds(tmp_path / "reflow")
    assert (got["seed_everything"], got["model_seed"], got["data_seed"]) == (7, 8, 9)
    assert got["config"].endswith("version_1/config.yaml")
    assert training_seeds(tmp_path / "missing") is None
