"""Values given to make (PROMPT, MODEL, EXP, ARGS, ...) reach the programs as typed; the shell runs none of them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def recording_python(tmp_path: Path) -> Path:
    """A stand-in for .venv/bin/python that appends its arguments (one JSON list per call) to tmp_path/calls."""
    py = tmp_path / "python"
    py.write_text(f"#!/bin/bash\nexec {sys.executable} -c 'import json, sys; open(sys.argv[1], \"a\")"
                  f".write(json.dumps(sys.argv[2:]) + \"\\n\")' {tmp_path}/calls \"$@\"\n")
    py.chmod(0o755)
    return py


def make_calls(tmp_path: Path, *args: str, env: dict | None = None) -> list[list[str]]:
    """Run make with the stand-in python; the argument lists it was called with."""
    py = recording_python(tmp_path)
    (tmp_path / "calls").unlink(missing_ok=True)
    subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", f"PY={py}", *args], cwd=ROOT,
                   check=True, capture_output=True, text=True, env=env)
    return [json.loads(line) for line in (tmp_path / "calls").read_text().splitlines()]


def hostile(tmp_path: Path, tag: str) -> str:
    """Text that runs `touch` if a shell (or make) expands it anywhere."""
    return f'$(touch {tmp_path}/PWNED_{tag}) "q `touch {tmp_path}/PWNED_{tag}b` \'x $(shell touch {tmp_path}/PWNED_{tag}c)'


def pwned(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.glob("PWNED*"))


def option(call: list[str], flag: str) -> str:
    return call[call.index(flag) + 1]


def test_generate_passes_prompt_model_steps_and_w_literally(tmp_path):
    prompt, model = hostile(tmp_path, "p"), hostile(tmp_path, "m")
    call, = make_calls(tmp_path, "generate", f"PROMPT={prompt}", f"MODEL={model}", "STEPS=1;touch PWNED", "W=2")
    assert call[:2] == ["-m", "instaflow.tools.generate"]
    assert option(call, "--prompt") == prompt and option(call, "--model") == model
    assert option(call, "--steps") == "1;touch PWNED" and option(call, "--guidance") == "2"
    assert pwned(tmp_path) == [] and not (ROOT / "PWNED").exists()


def test_the_defaults_still_apply(tmp_path):
    call, = make_calls(tmp_path, "generate")
    assert option(call, "--prompt") == "a large red circle in the center on a white background"
    assert option(call, "--model") == "runs/embedded/models/instaflow" and option(call, "--steps") == "1"
    export, = make_calls(tmp_path, "export", "MODEL=runs/embedded/models/rf2/")
    assert option(export, "--out") == "runs/export/rf2"  # OUT's default follows MODEL


def test_a_value_from_the_environment_is_literal_too(tmp_path):
    import os

    prompt = hostile(tmp_path, "env")
    call, = make_calls(tmp_path, "generate", env={**os.environ, "PROMPT": prompt})
    assert option(call, "--prompt") == prompt and pwned(tmp_path) == []


def test_export_demo_report_and_sweep_values(tmp_path):
    out, teacher, notes, sweep = (hostile(tmp_path, t) for t in ("o", "t", "n", "s"))
    calls = make_calls(tmp_path, "export", f"OUT={out}", "demo", f"TEACHER={teacher}", "PORT=7861 --share",
                       "report", f"NOTES={notes}", "sweep", f"SWEEP={sweep}")
    assert option(calls[0], "--out") == out
    assert option(calls[1], "--teacher") == teacher and option(calls[1], "--port") == "7861 --share"
    assert option(calls[2], "--notes") == notes
    assert calls[3][:3] == ["-m", "instaflow.tools.sweep", sweep]
    assert pwned(tmp_path) == []


def test_run_passes_exp_literally_and_splits_args_at_whitespace_only(tmp_path):
    exp = hostile(tmp_path, "x")
    call, = make_calls(tmp_path, "run", f"EXP={exp}", f"ARGS=--trainer.max_steps 3 $(touch {tmp_path}/PWNED_a) *")
    assert call[:4] == ["-m", "lightning_modules.cli", "--experiment", exp]
    assert call[4:] == ["--trainer.max_steps", "3", "$(touch", f"{tmp_path}/PWNED_a)", "*"]  # no glob, no command
    assert pwned(tmp_path) == []


def test_cluster_values_reach_the_launcher_literally(tmp_path):
    part = hostile(tmp_path, "part")
    call, = make_calls(tmp_path, "train-reflow", "NODES=2", f"PARTITION={part}", "TIME_LIMIT=1:00;touch x",
                       "JOB_NAME=j$(id)", f"SLURM_DIR={tmp_path}/s d", "DRY_RUN=1")
    assert call[:3] == ["-m", "instaflow.tools.launch", "slurm"]
    assert option(call, "--partition") == part and option(call, "--time") == "1:00;touch x"
    assert option(call, "--job-name") == "j$(id)" and option(call, "--dir") == f"{tmp_path}/s d"
    assert option(call, "--nodes") == "2" and "--dry-run" in call and pwned(tmp_path) == []
