"""Sweep run folders stay inside SAVE_DIR/NAME whatever the swept values; unsafe names are refused."""

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
    versions = [s.version(i, p) for i, p in enumerate(s.points())]
    root = (tmp_path / "save" / "s").resolve()
    assert len(set(versions)) == len(HOSTILE)  # escaping keeps different values apart
    for version, params in zip(versions, s.points()):
        assert "/" not in version and not version.startswith(".")
        # where Lightning writes the run: the logger the sweep's arguments configure
        log_dir = TensorBoardLogger(s.save_dir, name=s.name, version=version).log_dir
        assert (tmp_path / "save" / "s" / version).resolve().parent == root
        assert Path(log_dir).resolve().parent == root
        args = s.args(version, params)
        assert args[args.index("--trainer.logger.init_args.version") + 1] == version
    assert versions[-1] == "005-..%2F..%2Fn=ok-1.5"  # safe characters stay readable
    assert versions[0] == "000-..%2F..%2Fn=x%2F..%2F..%2F..%2Foutside"
    assert sweep.safe_version(".hidden") == "%2Ehidden"  # a leading '.' escaped


def test_a_long_value_is_cut_and_hashed_and_still_unique():
    from instaflow.tools.sweep import MAX_VERSION, safe_version

    a, b = safe_version("lr=" + "1" * 300), safe_version("lr=" + "1" * 299 + "2")
    assert len(a) == len(b) == MAX_VERSION and a != b


def test_unsafe_sweep_name_is_refused(tmp_path):
    from instaflow.tools import sweep

    path = sweep_file(tmp_path, name="../../elsewhere")
    with pytest.raises(SystemExit, match=r"sweep: .*s\.yaml: sweep name '../../elsewhere': use letters"):
        sweep.main([str(path), "--dry-run"])
