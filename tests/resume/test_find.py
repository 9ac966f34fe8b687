"""Rules of ``instaflow.resume.find.find_unfinished`` on hand-made run folders: which checkpoint, which mark.

- the running mark counts only a truly live process (host, boot, pid and start time), and only global
  rank 0 refuses;
- the newest readable checkpoint wins: cut, non-finite and other runs' checkpoints are skipped (said
  why), a missing ``last.ckpt`` (a ``save_last: link`` killed between unlink and link) is no loss, and
  a folder an interrupted swap left aside is used.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from instaflow.resume.find import find_unfinished
from instaflow.resume.marks import running_mark
from tests.resume.test_checkpoints import dcp_folder

LOGGER = "lightning.pytorch.loggers.TensorBoardLogger"


def make_run(tmp_path: Path) -> tuple[dict, Path]:
    """A run folder (version_0) whose saved config equals the returned one; its checkpoints folder."""
    cfg = {"trainer": {"logger": {"class_path": LOGGER, "init_args": {"save_dir": str(tmp_path), "name": "reflow"}}}}
    run = tmp_path / "reflow" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return cfg, run / "checkpoints"


def save(path: Path, step: int, w: float = 1.0, run: Path | None = None) -> Path:
    callbacks = {"EMA": {"shadow": [torch.full((2,), w)]}}
    if run is not None:
        callbacks["Resume"] = {"run": str(run)}
    torch.save({"global_step": step, "state_dict": {"unet.w": torch.full((3,), w)}, "callbacks": callbacks}, path)
    return path


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_reused_pid_is_a_stale_mark_and_only_rank_zero_refuses(tmp_path, sleeper, monkeypatch):
    """A mark naming a live pid counts only when its boot id and start time match too; a non-zero rank never
    refuses (Lightning's spawned ranks and torchrun's see their own rank 0's mark)."""
    for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    cfg, ckpts = make_run(tmp_path)
    save(ckpts / "last.ckpt", 3)
    live = running_mark(sleeper.pid)
    mark = ckpts / "fit_running.json"
    for stale in ({**live, "boot_id": "0" * 36}, {**live, "start_ticks": live["start_ticks"] - 7}):
        mark.write_text(json.dumps(stale))  # the pid is alive, but it is another process (after a reboot, reused)
        assert find_unfinished(cfg).step == 3
    mark.write_text(json.dumps(live))
    with pytest.raises(SystemExit, match=f"being trained by process {sleeper.pid}"):
        find_unfinished(cfg)
    for env in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.setenv(env, "1")
        assert find_unfinished(cfg).step == 3  # follows rank 0, which makes the decision
        monkeypatch.delenv(env)


def test_the_newest_readable_finite_checkpoint_of_this_run_is_resumed(tmp_path):
    cfg, ckpts = make_run(tmp_path)
    run = ckpts.parent
    save(ckpts / "epoch=0-step=4.ckpt", 4, run=run)
    save(ckpts / "epoch=0-step=8.ckpt", 8, run=run)
    save(ckpts / "epoch=0-step=12.ckpt", 12, w=float("nan"), run=run)  # diverged, written by an older version
    save(ckpts / "last.ckpt", 12, w=float("nan"), run=run)
    save(ckpts / "epoch=0-step=40.ckpt", 40, run=tmp_path / "reflow" / "version_7")  # a shared dirpath's other run
    said: list[str] = []
    found = find_unfinished(cfg, log=said.append)
    assert (found.ckpt.name, found.step) == ("epoch=0-step=8.ckpt", 8)
    assert any(f"skipping {ckpts / 'last.ckpt'}: " in s and "NaN/inf in unet.w" in s for s in said), said
    assert any("ignoring 1 checkpoint(s) of other runs" in s for s in said), said

    for p in ckpts.glob("*.ckpt"):
        if "step=8" not in p.name and "step=4" not in p.name:
            p.unlink()  # save_last: link killed between removing last.ckpt and linking it again
    assert find_unfinished(cfg).ckpt.name == "epoch=0-step=8.ckpt"


def test_a_folder_left_aside_by_an_interrupted_swap_is_resumed_from(tmp_path):
    """A kill between the two renames of a folder swap leaves the previous complete folder aside only."""
    cfg, ckpts = make_run(tmp_path)
    aside = dcp_folder(ckpts / ".last.ckpt.old-4242-0123abcd", step=5)
    found = find_unfinished(cfg)
    assert (found.ckpt, found.step) == (aside, 5)


def test_the_launch_continues_in_the_run_s_logger_version_and_refuses_a_planted_file(tmp_path):
    """What the CLI sets from a found checkpoint (TensorBoard also drops what was logged after it), and a planted
    file among the candidates stops the launch naming it instead of being skipped."""
    from instaflow.resume.find import Found, continue_from
    from tests.resume.test_checkpoints import plant_file

    found = Found(ckpt=tmp_path / "last.ckpt", step=7, version="version_2", run_dir=tmp_path)
    assert found.logger_settings("lightning.pytorch.loggers.TensorBoardLogger") == {"version": "version_2",
                                                                                   "purge_step": 8}
    assert found.logger_settings("lightning.pytorch.loggers.CSVLogger") == {"version": "version_2"}
    assert Found(ckpt=tmp_path, step=7, version=None, run_dir=tmp_path).logger_settings("x.TensorBoardLogger") == {}
    assert found.message().startswith(f"[resume] continuing {tmp_path} from step 7 ({tmp_path / 'last.ckpt'})")

    cfg, ckpts = make_run(tmp_path)
    save(ckpts / "epoch=0-step=4.ckpt", 4, run=ckpts.parent)
    assert continue_from(cfg).step == 4
    marker = tmp_path / "payload_ran"
    plant_file(ckpts / "last.ckpt", marker)
    with pytest.raises(SystemExit, match=r"\[resume\] .*last\.ckpt is not a plain checkpoint"):
        continue_from(cfg)
    assert not marker.exists()
