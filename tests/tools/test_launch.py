"""SLURM / torchrun launch: the job script, its submission (stand-in sbatch and srun), the Makefile path."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.tools.test_make_values import make_calls

PY = sys.executable
CLI = f"{PY} -m lightning_modules.cli"


def stand_in(bin_dir: Path, name: str, body: str) -> Path:
    """An executable ``name`` in ``bin_dir`` (put first on PATH) running the shell ``body``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """Stand-in sbatch (captures argv, the script, stdin) and srun (records its argv) on PATH."""
    cap = tmp_path / "captured"
    cap.mkdir()
    bin_dir = tmp_path / "bin"
    stand_in(bin_dir, "sbatch", f'echo "$@" > {cap}/argv\n'
                                f'if [ -n "${{1:-}}" ]; then cat "$1" > {cap}/script; else cat > {cap}/stdin; fi\n'
                                'echo "Submitted batch job 123"')
    stand_in(bin_dir, "srun", f'echo "$@" >> {cap}/srun_calls')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return cap


def stage_args(tmp_path: Path) -> list[str]:
    return ["--stage", "data", "-", f"{PY} -c pass",
            "--stage", "pairs", str(tmp_path / "pairs" / ".done"), f"{CLI} predict -c base.yaml -c pairs.yaml",
            "--stage", "reflow", str(tmp_path / "rf2" / "model_index.json"),
            f"{PY} -m instaflow.tools.timed {tmp_path}/timings reflow -- {CLI} fit -c base.yaml -c reflow.yaml"]


def test_slurm_submission_writes_the_job_script_and_returns_the_job_id(fake_slurm, tmp_path, capsys):
    from instaflow.tools import launch

    job = launch.main(["slurm", "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time", "01:00:00",
                       "--job-name", "chain", "--dir", str(tmp_path / "slurm"), *stage_args(tmp_path)])
    assert job == "123" and "SLURM job 123" in capsys.readouterr().out
    script = (fake_slurm / "script").read_text()
    assert (fake_slurm / "argv").read_text().split() == [str(tmp_path / "slurm" / "chain.sbatch")]
    assert script == (tmp_path / "slurm" / "chain.sbatch").read_text()
    sbatch = [line.split(" ", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH")]
    assert sbatch == ["--job-name=chain", "--partition=gpu", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8",
                      "--time=01:00:00", f"--output={tmp_path}/slurm/%x-%j.out", "--open-mode=append",
                      "--signal=SIGUSR1@90", "--requeue"]
    assert (tmp_path / "slurm").is_dir()  # sbatch needs the log folder before the job starts
    lines = script.splitlines()
    # the CLI calls run on every task with the world as explicit overrides after the config files
    srun = [line.strip() for line in lines if "srun" in line and not line.startswith("#")]
    assert len(srun) == 2
    assert srun[0] == (f"{PY} -m lightning_modules.cli predict -c base.yaml -c pairs.yaml".replace(
        PY, f"srun --kill-on-bad-exit=1 --nodes=2 --ntasks-per-node=8 {PY}", 1) + " --trainer.num_nodes 2 --trainer.devices 8 "
        '--trainer.default_root_dir "$RUN_ROOT"/pairs' f" && touch {tmp_path}/pairs/.done")
    assert f'RUN_ROOT={tmp_path}/slurm/"$RUN_ID"' in lines  # the run folder: one fixed line of the script
    assert srun[1].startswith(f"{PY} -m instaflow.tools.timed {tmp_path}/timings reflow -- srun --kill-on-bad-exit=1 --nodes=2 ")
    assert srun[1].endswith("fit -c base.yaml -c reflow.yaml --trainer.num_nodes 2 --trainer.devices 8 "
                            '--trainer.default_root_dir "$RUN_ROOT"/reflow')
    assert f"{PY} -c pass" in lines  # not a CLI call: runs once, on the batch node, without srun
    assert f"if [ ! -e {tmp_path}/rf2/model_index.json ]; then" in lines
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_job_script_runs_stages_in_order_skips_finished_ones_and_keys_requeue_folders_by_job(fake_slurm, tmp_path):
    """Run the generated script under bash with SLURM's variables and the stand-in srun."""
    from instaflow.tools import launch

    (tmp_path / "rf2").mkdir()
    (tmp_path / "pairs").mkdir()  # the predict stage writes its shards there (the stand-in srun does not)
    (tmp_path / "rf2" / "model_index.json").write_text("{}")  # the reflow stage finished before a requeue
    args = ["--nodes", "2", "--gpus-per-node", "4", *stage_args(tmp_path)]
    a = launch._parser().parse_args(["slurm", *args])
    stages = [launch.Stage.parse(*s) for s in a.stage]
    script = launch.slurm_script(stages, launch.World(2, 4), workdir=str(tmp_path), run_dir="runs/slurm")
    env = {**os.environ, "SLURM_JOB_ID": "4242"}
    env.pop("SLURM_ARRAY_JOB_ID", None)
    subprocess.run(["bash", "-c", script], env=env, check=True, cwd=tmp_path)
    calls = (fake_slurm / "srun_calls").read_text().splitlines()
    assert calls == [f"--kill-on-bad-exit=1 --nodes=2 --ntasks-per-node=4 {PY} -m lightning_modules.cli predict -c base.yaml -c pairs.yaml "
                     "--trainer.num_nodes 2 --trainer.devices 4 --trainer.default_root_dir runs/slurm/4242/pairs"]
    assert (tmp_path / "pairs" / ".done").exists()  # the marker is written after success
    # run again (a requeue): the finished stage is skipped too, srun is not called again
    subprocess.run(["bash", "-c", script], env=env, check=True, cwd=tmp_path)
    assert len((fake_slurm / "srun_calls").read_text().splitlines()) == 1


def test_dry_run_prints_the_script_and_submits_nothing(fake_slurm, tmp_path, capsys):
    from instaflow.tools import launch

    assert launch.main(["slurm", "--nodes", "1", "--gpus-per-node", "2", "--dry-run", "--dir", str(tmp_path / "s"),
                        *stage_args(tmp_path)]) is None
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash") and "#SBATCH --ntasks-per-node=2" in out and "--trainer.devices 2" in out
    assert not (fake_slurm / "argv").exists() and not (tmp_path / "s").exists()


def test_no_requeue_drops_the_signal_and_turns_lightnings_auto_requeue_off(tmp_path):
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from instaflow.tools import launch
    from lightning_modules.cli import main

    stages = [launch.Stage.parse("fit", "-", f"{CLI} fit -c a.yaml")]
    script = launch.slurm_script(stages, launch.World(1, 2), requeue=False)
    assert "--signal" not in script and "--requeue" not in script
    assert shlex.quote(launch.NO_REQUEUE_PLUGIN) in script
    # the override the script passes is a valid trainer plugin: SLURMEnvironment(auto_requeue=False)
    exp = ROOT / "experiments" / "embedded" / "reflow.yaml"
    c = main(["-c", str(ROOT / "experiments" / "base" / "default.yaml"), "-c", str(exp),
              "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.plugins", launch.NO_REQUEUE_PLUGIN],
             run=False)
    env = c.config_init["trainer"]["plugins"]
    env = env[0] if isinstance(env, list) else env
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue is False


def test_lightning_detects_slurm_under_srun_with_requeue_on_sigusr1(monkeypatch):
    """The script's SIGUSR1 matches what Lightning's SLURM environment listens for by default."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    for k, v in {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NAME": "chain", "SLURM_JOB_ID": "9", "SLURM_PROCID": "1",
                 "SLURM_LOCALID": "1", "SLURM_NODEID": "0", "SLURM_NODELIST": "node1"}.items():
        monkeypatch.setenv(k, v)
    assert SLURMEnvironment.detect()
    env = SLURMEnvironment()
    assert env.auto_requeue and env.requeue_signal == signal.SIGUSR1
    assert env.world_size() == 2 and env.global_rank() == 1 and env.main_address == "node1"
    monkeypatch.setenv("SLURM_NNODES", "1")
    env.validate_settings(num_devices=2, num_nodes=1)  # the overrides the script appends agree with srun
    with pytest.raises(ValueError, match="ntasks-per-node=2"):  # a mismatch fails before training starts
        env.validate_settings(num_devices=8, num_nodes=1)
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")  # interactive allocation: not treated as a SLURM launch
    assert not SLURMEnvironment.detect()
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "GROUP_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                 "MASTER_ADDR": "h", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}.items():
        monkeypatch.setenv(k, v)  # what torchrun sets in each process
    assert TorchElasticEnvironment.detect()


def test_torchrun_lines_and_run_once_stages_on_node_rank_zero(tmp_path, capsys):
    from instaflow.tools import launch

    base = ["torchrun", "--nnodes", "2", "--nproc-per-node", "8", "--rdzv-endpoint", "node0:29500", "--dry-run"]
    launch.main([*base, "--node-rank", "0", *stage_args(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    tr = str(Path(PY).parent / "torchrun")
    assert f"{PY} -c pass" in out
    assert f"  {tr} --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=node0:29500 --rdzv-id=instaflow-pairs " \
           "-m lightning_modules.cli predict -c base.yaml -c pairs.yaml --trainer.num_nodes 2 --trainer.devices 8 " \
           f"&& touch {tmp_path}/pairs/.done" in out
    launch.main([*base, "--node-rank", "1", *stage_args(tmp_path)])
    out1 = capsys.readouterr().out
    assert f"{PY} -c pass" not in out1 and "# data: runs on node rank 0" in out1 and out1.count("--rdzv-id=") == 2


def test_local_mode_runs_stages_skips_existing_outputs_and_writes_markers(tmp_path):
    from instaflow.tools import launch

    log = tmp_path / "log.txt"
    cmd = f"{PY} -c \"import sys; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n')\" {log}"
    (tmp_path / "b.out").touch()
    rc = launch.main(["local", "--stage", "a", str(tmp_path / "a.done"), f"{cmd} a",
                      "--stage", "b", str(tmp_path / "b.out"), f"{cmd} b", "--stage", "c", "-", f"{cmd} c"])
    assert rc == 0 and log.read_text().split() == ["a", "c"] and (tmp_path / "a.done").exists()
    assert launch.main(["local", "--stage", "x", "-", f"{PY} -c 'raise SystemExit(3)'"]) == 3


def _make(*args: str, env: dict | None = None) -> str:
    return subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", *args], cwd=ROOT, check=True,
                          capture_output=True, text=True, env=env).stdout


def test_make_train_reflow_submits_the_same_stage_commands_as_the_local_chain(fake_slurm, tmp_path):
    from instaflow.tools import launch

    # the local chain's commands, as make would run them (nothing runs: -n), the markers' touch removed
    local = [line.split(" && touch ")[0] for line in _make("-n", "-B", "train-reflow").splitlines()
             if " -m lightning_modules." in line or " -m data." in line or " -m instaflow.tools." in line]
    # the stages the cluster path passes to instaflow.tools.launch (as the launcher receives them)
    call, = make_calls(tmp_path, "train-reflow", "NODES=2", "GPUS_PER_NODE=8", "PARTITION=gpu")
    assert call[:2] == ["-m", "instaflow.tools.launch"]
    a = launch._parser().parse_args(call[2:])
    assert (a.mode, a.nodes, a.gpus_per_node, a.partition, a.dry_run) == ("slurm", 2, 8, "gpu", False)
    py = str(tmp_path / "python")  # the recording stand-in the commands name
    assert [cmd.replace(py, ".venv/bin/python") for _, _, cmd in a.stage] == local and len(local) == 10
    assert [name for name, _, _ in a.stage][:4] == ["data", "pairs_teacher", "pairs_teacher_val", "reflow"]
    assert "instaflow.tools.launch" not in _make("-n", "train-reflow")  # plain make keeps the local chain
    tr, = make_calls(tmp_path, "train-reflow", "NODES=2", "GPUS_PER_NODE=8", "LAUNCHER=torchrun", "RDZV=node0:29400")
    assert tr[2:10] == ["torchrun", "--nodes", "2", "--gpus-per-node", "8", "--rdzv-endpoint", "node0:29400", "--stage"]

    # and for real, with the stand-in sbatch: one job whose script holds all ten stages
    out = _make("train-reflow", "NODES=2", "GPUS_PER_NODE=8", "PARTITION=gpu", "TIME_LIMIT=02:00:00", f"SLURM_DIR={tmp_path}/s")
    assert "SLURM job 123" in out
    script = (fake_slurm / "script").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --time=02:00:00" in script and "#SBATCH --requeue" in script
    assert script.count("--trainer.num_nodes 2 --trainer.devices 8") == 8  # the four predict and four fit stages
    assert script.count("# stage ") == 10
    dry = _make("train-reflow", "NODES=1", "GPUS_PER_NODE=2", "DRY_RUN=1", "REQUEUE=0", f"SLURM_DIR={tmp_path}/d")
    assert "#SBATCH --requeue" not in dry and "auto_requeue" in dry
    assert dry.count("#SBATCH --ntasks-per-node=2") == 1 and not (tmp_path / "d").exists()
    assert json.dumps("--partition") not in dry and "#SBATCH --partition" not in dry
