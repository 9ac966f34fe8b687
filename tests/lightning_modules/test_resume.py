"""Resume anywhere: a fit killed with kill -9 or SIGTERM continues from its own checkpoint when rerun.

The killed runs are subprocesses of ``python -m lightning_modules.cli`` that kill themselves at a
fixed step (``KillAt``: a real signal, delivered by the kernel). A resumed run is the uninterrupted run (bit for bit, same machine): the checkpoint holds the weights,
AdamW moments, LR scheduler, EMA and step, and also where each training stream stood (``data.stream_state``)
and each rank's generator of t and caption dropout (``lightning_modules.training_rng``), so the steps after
the resume point see the batches and draws they would have seen. (2 ranks with DataLoader workers:
``tests/lightning_modules/test_exact_resume.py``.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from tests.conftest import ROOT
from tests.lightning_modules.test_chain import BASE, cli, gen_pairs, tiny_yaml

MAX_STEPS, EVERY, KILL = 40, 10, 25


class KillAt(L.Callback):
    """Rank ``rank`` sends ``signum`` to its own process after optimizer step ``step``, once (``once`` marks it
    done)."""

    def __init__(self, step: int, signum: int, once: str, rank: int = 0) -> None:
        self.step, self.signum, self.once, self.rank = step, signum, Path(once), rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank and not self.once.exists():
            self.once.write_text("killed\n")
            os.kill(os.getpid(), self.signum)


@pytest.fixture(scope="module")
def pairs(tiny_world, tiny_sd_folder, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume_pairs")
    gen_pairs(root, tiny_world, str(tiny_sd_folder), root / "pairs")
    return root / "pairs"


def reflow_config(root: Path, tiny_sd_folder: Path, pairs: Path, kill: tuple[int, int] | None = None) -> str:
    """The embedded reflow experiment on the tiny SD: checkpoints every 10 steps, validation (EMA grid) at 20."""
    root.mkdir(parents=True, exist_ok=True)
    src = tiny_yaml("reflow.yaml", root, {
        "init": str(tiny_sd_folder), "export_dir": str(root / "export"), "lr": 2e-3, "warmup_steps": 5,
        "grid_steps": [1]},
        {"train": str(pairs), "val": str(pairs), "batch_size": 8, "num_workers": 0, "shuffle_buffer": 32},
        {"max_steps": MAX_STEPS, "val_check_interval": 20, "limit_val_batches": 1, "log_every_n_steps": 5,
         "enable_progress_bar": False})
    cfg = yaml.safe_load(Path(src).read_text())
    cfg["trainer"]["logger"]["init_args"]["max_queue"] = 1  # events reach the file at once, as a long run's have
    for c in cfg["trainer"]["callbacks"]:
        if c["class_path"].endswith("ModelCheckpoint"):
            c["init_args"].update(every_n_train_steps=EVERY, save_top_k=-1)
    if kill is not None:
        cfg["trainer"]["callbacks"].append({"class_path": f"{__name__}.KillAt", "init_args": {
            "step": kill[0], "signum": int(kill[1]), "once": str(root / "killed_once")}})
    Path(src).write_text(yaml.safe_dump(cfg))
    return src


def run_cli(config: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "lightning_modules.cli", "fit", "-c", BASE, "-c", config],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def run_group(cmd: list[str], env: dict, timeout: float = 300) -> tuple[int, str]:
    """(returncode, stdout + stderr) of a command run in its own process group, all of which is killed on timeout
    (torchrun's workers included)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s: {out[-3000:]}")
    return proc.returncode, out


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def ema_shadow(ckpt: dict) -> list[torch.Tensor]:
    return next(v for k, v in ckpt["callbacks"].items() if k.startswith("EMA"))["shadow"]


def assert_same_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[k], sb[k])
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert all(torch.equal(x, y) for x, y in zip(ema_shadow(a), ema_shadow(b)))


def scalar_events(logdir: Path, tag: str) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir))
    ea.Reload()
    return ea.Scalars(tag)


def flat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in ts])


@pytest.fixture(scope="module")
def uninterrupted(pairs, tiny_sd_folder, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    cli(["fit", "-c", BASE, "-c", reflow_config(root, tiny_sd_folder, pairs)])
    return root


def test_kill_9_mid_fit_resumes_from_the_last_checkpoint(pairs, tiny_sd_folder, uninterrupted, tmp_path):
    cfg = reflow_config(tmp_path, tiny_sd_folder, pairs, kill=(KILL, signal.SIGKILL))
    ckpts = tmp_path / "ckpt" / "reflow.yaml"
    killed = run_cli(cfg)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert load(ckpts / "last.ckpt")["global_step"] == 20  # the last periodic checkpoint before step 25
    assert not (tmp_path / "export").exists() and not (ckpts / "fit_finished.json").exists()

    resumed = run_cli(cfg)  # the same command again
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"[resume] continuing {tmp_path / 'runs' / 'reflow' / 'version_0'} from step 20" in resumed.stdout
    assert sorted(p.name for p in (tmp_path / "runs" / "reflow").iterdir()) == ["version_0"]  # same run folder
    assert (tmp_path / "export" / "model_index.json").exists() and (ckpts / "fit_finished.json").exists()
    # one curve: the resumed writer purges what the killed run logged after step 20 (SummaryWriter's purge_step)
    run = tmp_path / "runs" / "reflow" / "version_0"
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["logger"]["init_args"]["purge_step"] == 21
    steps = [e.step for e in scalar_events(run, "train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] >= MAX_STEPS - 5, steps

    full = uninterrupted / "ckpt" / "reflow.yaml"
    # identical: the state it resumed from is the uninterrupted run's at step 20, bit for bit
    assert_same_state(load(ckpts / "epoch=0-step=20.ckpt"), load(full / "epoch=0-step=20.ckpt"))
    # identical: final step count and learning rate
    a, b = load(ckpts / "last.ckpt"), load(full / "last.ckpt")
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    assert a["lr_schedulers"][0]["_last_lr"] == b["lr_schedulers"][0]["_last_lr"]
    # equal: steps 21-40 saw the same batches and draws (stream position and generator restored)
    assert_same_state(a, b)


def test_sigterm_saves_the_step_it_stopped_at_and_the_rerun_continues_there(pairs, tiny_sd_folder, tmp_path):
    cfg = reflow_config(tmp_path, tiny_sd_folder, pairs, kill=(KILL, signal.SIGTERM))
    ckpts = tmp_path / "ckpt" / "reflow.yaml"
    stopped = run_cli(cfg)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]  # a failure, for make and SLURM scripts
    assert f"[resume] SIGTERM: saved step {KILL}" in stopped.stdout
    assert load(ckpts / "last.ckpt")["global_step"] == KILL  # not the periodic step 20

    resumed = run_cli(cfg)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from step {KILL}" in resumed.stdout
    assert load(ckpts / "last.ckpt")["global_step"] == MAX_STEPS

    again = run_cli(cfg)  # finished: running it again is a new run from step 0, not a resume
    assert again.returncode == 0 and "[resume] continuing" not in again.stdout
    assert sorted(p.name for p in (tmp_path / "runs" / "reflow").iterdir()) == ["version_0", "version_1"]


def test_only_the_runs_own_unfinished_checkpoint_is_continued(tmp_path):
    """Unit rules of ``find_unfinished``: newest own run; finished or changed config starts afresh."""
    from instaflow.resume.find import config_differences, find_unfinished

    ckpt_file = tmp_path / "x.ckpt"
    torch.save({"global_step": 7}, ckpt_file)
    cfg = {"trainer": {"logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                  "init_args": {"save_dir": str(tmp_path), "name": "reflow", "version": None}},
                       "max_steps": 10, "default_root_dir": "runs/slurm/1/reflow"}, "model": {"lr": 1e-3}}

    def run(version: str, saved: dict, last: bool = True, finished: bool = False) -> None:
        d = tmp_path / "reflow" / version
        (d / "checkpoints").mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump(saved))
        if last:
            (d / "checkpoints" / "last.ckpt").write_bytes(ckpt_file.read_bytes())
        if finished:
            (d / "checkpoints" / "fit_finished.json").write_text("{}")

    said: list[str] = []
    assert find_unfinished(cfg, log=said.append) is None  # nothing there yet
    run("version_0", cfg)
    found = find_unfinished(cfg)
    assert (found.version, found.step, found.ckpt.parent.parent.name) == ("version_0", 7, "version_0")
    # a resubmitted SLURM job differs in default_root_dir (keyed by job id) and passes ckpt_path: still its own
    moved = {**cfg, "ckpt_path": "x", "trainer": {**cfg["trainer"], "default_root_dir": "runs/slurm/2/reflow"}}
    assert config_differences(cfg, moved) == [] and find_unfinished(moved).version == "version_0"
    # another learning rate is another run: not continued, and said why
    other = {**cfg, "model": {"lr": 2e-3}}
    assert find_unfinished(other, log=said.append) is None
    assert "model.lr" in said[-1] and "--ckpt_path" in said[-1]
    run("version_1", cfg, finished=True)  # the newest own run finished: start afresh
    assert find_unfinished(cfg) is None
    run("version_10", cfg, last=False)  # killed before its first checkpoint (and numbered past 9: sorted as numbers)
    assert find_unfinished(cfg) is None


def test_a_run_still_training_on_this_machine_is_not_resumed_twice(tmp_path):
    """fit_running.json names the process training into a folder: alive here -> refused; gone -> a stale mark."""
    import json

    from instaflow.resume.marks import running_mark
    from instaflow.resume.find import find_unfinished

    d = tmp_path / "reflow" / "version_0"
    (d / "checkpoints").mkdir(parents=True)
    cfg = {"trainer": {"logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                  "init_args": {"save_dir": str(tmp_path), "name": "reflow"}}}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    torch.save({"global_step": 3}, d / "checkpoints" / "last.ckpt")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (d / "checkpoints" / "fit_running.json").write_text(json.dumps(running_mark(other.pid)))
        with pytest.raises(SystemExit, match=f"being trained by process {other.pid}"):
            find_unfinished(cfg)
    finally:
        other.kill()
        other.wait()
    assert find_unfinished(cfg).step == 3  # the process is gone: its mark is stale


def wait_for(path: Path, timeout: float) -> bool:
    import time

    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline:
        time.sleep(0.05)
    return path.exists()


def timed_stage(tmp_path: Path, stopped: Path) -> subprocess.Popen:
    """``instaflow.tools.timed`` running a stand-in stage that, on SIGTERM, touches ``stopped`` and exits 143;
    returned once the stage runs."""
    ready = tmp_path / "ready"
    stage = ("import signal, sys, time, pathlib; "
             f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(stopped)!r}).touch(), sys.exit(143))); "
             f"pathlib.Path({str(ready)!r}).touch(); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-m", "instaflow.tools.timed", str(tmp_path / "timings"), "reflow", "--",
                             sys.executable, "-c", stage], cwd=ROOT)
    wait_for(ready, 60)
    return proc


def test_a_killed_timed_wrapper_takes_its_stage_down_with_sigterm(tmp_path):
    """kill -9 of the wrapper (it cannot pass anything on): the kernel sends the stage SIGTERM (parent-death signal)."""
    proc = timed_stage(tmp_path, tmp_path / "stopped")
    proc.kill()
    proc.wait()
    assert wait_for(tmp_path / "stopped", 30), "the stage trained on as an orphan"


def test_timed_counts_the_killed_attempts_of_a_resumed_stage(tmp_path):
    """A stage's recorded wall time is that of every attempt, not only the run that finally finished it."""
    import json

    from instaflow.tools import timed

    slow = [sys.executable, "-c", "import time, sys; time.sleep(0.5); sys.exit(143)"]
    assert timed.main([str(tmp_path), "reflow", "--", *slow]) == 143
    assert not (tmp_path / "reflow.json").exists()
    assert timed.main([str(tmp_path), "reflow", "--", sys.executable, "-c", "pass"]) == 0
    rec = json.loads((tmp_path / "reflow.json").read_text())
    assert [a["returncode"] for a in rec["attempts"]] == [143] and rec["wall_s"] >= 0.5
    assert not (tmp_path / ".reflow.attempts.json").exists()
    assert timed.main([str(tmp_path), "eval", "--", *slow]) == 143  # an unfinished stage is not a record
    assert sorted(timed.read_timings(tmp_path)) == ["reflow"]


def test_timed_wrapper_passes_sigterm_on_to_the_stage(tmp_path):
    """``kill <pid of the timed wrapper>`` reaches the stage it runs (which then saves and exits 143)."""
    proc = timed_stage(tmp_path, tmp_path / "stopped")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    assert not (tmp_path / "timings" / "reflow.json").exists()  # a stopped stage leaves no timing record


def test_under_torchrun_a_killed_two_rank_fit_resumes_on_every_rank(pairs, tiny_sd_folder, tmp_path):
    """torchrun, 2 CPU ranks (gloo, DDP): rank 0 is killed with kill -9 at step 7, torchrun stops rank 1; the
    same torchrun command again continues both ranks from the step-5 checkpoint to the end."""
    cfg = reflow_config(tmp_path, tiny_sd_folder, pairs, kill=(7, signal.SIGKILL))
    c = yaml.safe_load(Path(cfg).read_text())
    c["trainer"].update(max_steps=12, val_check_interval=1000, limit_val_batches=0, accelerator="cpu", devices=2,
                        strategy="ddp")
    for cb in c["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["every_n_train_steps"] = 5
    Path(cfg).write_text(yaml.safe_dump(c))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "lightning_modules.cli", "fit", "-c", BASE, "-c", cfg]
    rc, _ = run_group(cmd, env)
    assert rc != 0
    ckpts = tmp_path / "ckpt" / "reflow.yaml"
    assert load(ckpts / "last.ckpt")["global_step"] == 5
    rc, out = run_group(cmd, env)
    assert rc == 0, out[-4000:]
    assert "[resume] continuing" in out and "from step 5" in out
    assert json.loads((ckpts / "fit_finished.json").read_text())["step"] == 12  # both ranks ran to the end (rc 0)


def test_in_a_requeued_slurm_job_the_newer_of_hpc_and_last_checkpoint_wins(tmp_path, monkeypatch):
    """Lightning's requeue checkpoint (hpc_ckpt_<n>.ckpt in default_root_dir) against the run's own last.ckpt."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from instaflow.resume.find import find_unfinished

    monkeypatch.setattr(SLURMEnvironment, "detect", staticmethod(lambda: True))
    root = tmp_path / "slurm" / "123" / "reflow"
    root.mkdir(parents=True)
    run = tmp_path / "reflow" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
              "init_args": {"save_dir": str(tmp_path), "name": "reflow"}}
    cfg = {"trainer": {"default_root_dir": str(root), "logger": logger}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    torch.save({"global_step": 160}, run / "checkpoints" / "last.ckpt")
    torch.save({"global_step": 100}, root / "hpc_ckpt_1.ckpt")
    torch.save({"global_step": 230}, root / "hpc_ckpt_2.ckpt")  # saved on the requeue signal, after last.ckpt
    found = find_unfinished(cfg)
    assert (found.ckpt.name, found.step, found.version) == ("hpc_ckpt_2.ckpt", 230, "version_0")
    (root / "hpc_ckpt_2.ckpt").unlink()  # a node lost after last.ckpt at 160: the older hpc checkpoint loses
    assert (find_unfinished(cfg).ckpt.name, find_unfinished(cfg).step) == ("last.ckpt", 160)
