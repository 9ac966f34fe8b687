"""Sweep run folders stay inside SAVE_DIR/NAME whatever the swept values; records are read tolerantly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

HOSTILE = ["x/../../../outside", "a/b", "..", ".hidden", "100%", "ok-1.5"]


def sweep_file(tmp_path, **extra):
    spec = {"configs": [str(ROOT / "experiments" / "base" / "default.yaml")], "metric": "val/loss",
            "save_dir": str(tmp_path / "save"), "grid": {"data.init_args.name": HOSTILE}, **extra}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_values_with_slashes_and_dots_name_one_folder_inside_save_dir(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    from instaflow.tools import sweep

    s = sweep.Sweep.load(sweep_file(tmp_path, short={"data.init_args.name": "../../n"}))
    runs = s.runs()
    root = (tmp_path / "save" / "s").resolve()
    assert len({r.version for r in runs}) == len(HOSTILE)  # escaping keeps different values apart
    for run in runs:
        assert "/" not in run.version and not run.version.startswith(".")
        # where Lightning writes the run: the logger the sweep's arguments configure
        log_dir = TensorBoardLogger(s.save_dir, name=s.name, version=run.version).log_dir
        assert (tmp_path / "save" / "s" / run.version).resolve().parent == root
        assert Path(log_dir).resolve().parent == root
        i = run.args.index("--trainer.logger.init_args.version")
        assert run.args[i + 1] == run.version
    assert runs[-1].version == "%2E.%2F..%2Fn=ok-1.5"  # safe characters stay readable, a leading '.' escaped
    assert runs[0].version == "%2E.%2F..%2Fn=x%2F..%2F..%2F..%2Foutside"


def test_a_long_value_is_cut_and_hashed_and_still_unique():
    from instaflow.tools.sweep import MAX_VERSION, safe_version

    a, b = safe_version("lr=" + "1" * 300), safe_version("lr=" + "1" * 299 + "2")
    assert len(a) == len(b) == MAX_VERSION and a != b


def test_unsafe_sweep_name_is_refused(tmp_path):
    from instaflow.tools import sweep

    path = sweep_file(tmp_path, name="../../elsewhere")
    with pytest.raises(SystemExit, match="sweep: sweep name '../../elsewhere': use letters"):
        sweep.main([str(path), "--dry-run"])


def test_a_cut_record_counts_as_unfinished_not_as_a_crash(tmp_path):
    from instaflow.tools import sweep

    s = sweep.Sweep.load(sweep_file(tmp_path))
    run = s.runs()[-1]
    folder = s.run_dir(run.version)
    folder.mkdir(parents=True)
    (folder / sweep.RECORD).write_text('{"version": "ok-1')  # a kill in the middle of an old plain write
    assert sweep.finished(s, run) is None
    rec = sweep.record_run(s, run, returncode=1)
    assert rec["status"] == "failed (exit 1)" and rec["value"] is None
