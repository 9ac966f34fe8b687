"""No shell text is built from a value: launcher scripts pass hostile arguments literally and refuse unsafe names."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from instaflow.tools import launch

PY = sys.executable
# each would run `touch PWNED...` if the shell expanded it; ${...} forms were left unquoted before
HOSTILE = ["$(touch PWNED1)", "`touch PWNED2`", "${IFS}x", "${UNSET:-$(touch PWNED3)}", "a b;touch PWNED4", "'\"",
           "${HOME}"]


def recorder(tmp_path: Path) -> list[str]:
    """A command that writes its arguments, as received, to tmp_path/argv.json."""
    rec = tmp_path / "rec.py"
    rec.write_text("import json, sys\nopen(sys.argv[1], 'w').write(json.dumps(sys.argv[2:]))\n")
    return [PY, str(rec), str(tmp_path / "argv.json")]


def pwned(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.rglob("PWNED*"))


def received(tmp_path: Path) -> list[str]:
    return json.loads((tmp_path / "argv.json").read_text())


def stage_cmd(tmp_path: Path) -> str:
    return shlex.join(recorder(tmp_path) + HOSTILE)


def test_slurm_script_passes_hostile_arguments_literally(tmp_path):
    stages = [launch.Stage.parse("once", "-", stage_cmd(tmp_path))]
    script = launch.slurm_script(stages, launch.World(1, 1), workdir=str(tmp_path))
    env = {**os.environ, "SLURM_JOB_ID": "7"}
    env.pop("SLURM_ARRAY_JOB_ID", None)
    subprocess.run(["bash", "-c", script], env=env, check=True, cwd=tmp_path)
    assert received(tmp_path) == HOSTILE and pwned(tmp_path) == []


def test_cli_stage_under_srun_gets_literal_arguments_and_the_job_keyed_folder(tmp_path):
    """Through a stand-in srun: the CLI call's arguments arrive as written; only RUN_ROOT expands."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/bash\n{PY} -c 'import json, sys; "
                                  f"open(sys.argv[1], \"w\").write(json.dumps(sys.argv[2:]))' {tmp_path}/argv.json \"$@\"\n")
    (bin_dir / "srun").chmod(0o755)
    cmd = shlex.join([PY, "-m", launch.CLI_MODULE, "fit", *HOSTILE])
    script = launch.slurm_script([launch.Stage.parse("fit", "-", cmd)], launch.World(1, 2), workdir=str(tmp_path),
                                 run_dir="runs/x y")
    env = {**os.environ, "SLURM_JOB_ID": "7", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("SLURM_ARRAY_JOB_ID", None)
    subprocess.run(["bash", "-c", script], env=env, check=True, cwd=tmp_path)
    args = received(tmp_path)
    assert args[:7] == ["--kill-on-bad-exit=1", "--nodes=1", "--ntasks-per-node=2", PY, "-m", launch.CLI_MODULE, "fit"]
    assert args[7:7 + len(HOSTILE)] == HOSTILE and pwned(tmp_path) == []
    assert args[-2:] == ["--trainer.default_root_dir", "runs/x y/7/fit"]


@pytest.mark.parametrize("mode", ["local", "torchrun"])
def test_dry_run_lines_run_by_bash_pass_arguments_literally(mode, tmp_path, capsys):
    extra = ["--node-rank", "0"] if mode == "torchrun" else []
    assert launch.main([mode, "--dry-run", *extra, "--stage", "once", "-", stage_cmd(tmp_path)]) is None
    subprocess.run(["bash", "-euo", "pipefail", "-c", capsys.readouterr().out], check=True, cwd=tmp_path)
    assert received(tmp_path) == HOSTILE and pwned(tmp_path) == []


def test_local_mode_runs_hostile_arguments_literally(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert launch.main(["local", "--stage", "once", "-", stage_cmd(tmp_path)]) == 0
    assert received(tmp_path) == HOSTILE and pwned(tmp_path) == []


def test_a_guard_with_a_newline_stays_inside_its_comment_and_test(tmp_path):
    guard = "out\ntouch PWNED5\n.done"
    stages = [launch.Stage.parse("once", guard, stage_cmd(tmp_path))]
    script = launch.slurm_script(stages, launch.World(1, 1), workdir=str(tmp_path))
    comment, = [ln for ln in script.splitlines() if ln.startswith("# stage ")]
    assert comment.endswith(r"skipped when out\ntouch PWNED5\n.done exists)")  # escaped: one comment line
    env = {**os.environ, "SLURM_JOB_ID": "7"}
    subprocess.run(["bash", "-c", script], env=env, check=True, cwd=tmp_path)
    assert pwned(tmp_path) == [] and (tmp_path / guard).exists()  # the marker is the literal path


@pytest.mark.parametrize("args, named", [
    (["--stage", "x\n#SBATCH --wrap=touch PWNED", "-", "true"], "stage name"),
    (["--stage", "a b", "-", "true"], "stage name"),
    (["--stage", "..", "-", "true"], "stage name"),
    (["--job-name", "j\ntouch PWNED", "--stage", "a", "-", "true"], "job name"),
    (["--partition", "gpu\ntouch PWNED", "--stage", "a", "-", "true"], "partition"),
    (["--time", "1:00 --wrap=x", "--stage", "a", "-", "true"], "time limit"),
    (["--output", "log'x", "--stage", "a", "-", "true"], "log path"),
])
def test_unsafe_names_and_sbatch_values_are_refused_with_the_rule(args, named, tmp_path):
    with pytest.raises(SystemExit, match=f"launch: {named} .*(letters, digits|one word)"):
        launch.main(["slurm", "--dry-run", "--dir", str(tmp_path), *args])
    assert pwned(tmp_path) == []
