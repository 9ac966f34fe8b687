"""What a fit leaves on disk is safe: atomic checkpoints, resume past cut or poisoned ones, no code unpickled.

Real tiny fits (``python -m lightning_modules.cli`` subprocesses on the tiny SD, 12 steps, a
checkpoint every 4) are killed with a real SIGKILL, sent by the process to itself at a fixed
moment: after an optimizer step (``KillAt``) or in the middle of writing ``last.ckpt``
(``KillWhileWriting``), whichever way the checkpoint IO writes it.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from tests.lightning_modules.test_chain import BASE, cli, tiny_yaml
from tests.lightning_modules.test_distributed import write_step_shards
from tests.lightning_modules.test_resume import load, run_cli
from tests.resume.test_checkpoints import Payload, dcp_folder, plant_file

STEPS, EVERY = 12, 4


def _arm_kill_in_last_ckpt_write() -> None:
    """From now on, writing ``last.ckpt`` kills this process (SIGKILL) halfway, whichever IO writes it.

    Lightning's default IO writes a temporary file in ``$TMPDIR`` and ``shutil.move``s it; on a
    cluster ``$TMPDIR`` is another filesystem, so the move is a copy: simulated here (the rename
    fails with EXDEV) and killed after half the bytes. An atomic write (``instaflow.state``) is
    killed while its temporary file beside the target is half written.
    """
    real_rename, real_fsync = os.rename, os.fsync

    def rename(src, dst, *a, **kw):
        if os.path.basename(str(dst)) == "last.ckpt" and os.path.dirname(os.path.abspath(src)) != os.path.dirname(
                os.path.abspath(dst)):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(src, dst, *a, **kw)

    def copyfile(src, dst, *a, **kw):
        data = Path(src).read_bytes()
        with open(dst, "wb") as f:
            f.write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    def fsync(fd):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if name.startswith(".last.ckpt.tmp-"):
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_fsync(fd)

    os.rename, shutil.copyfile, os.fsync = rename, copyfile, fsync


class KillWhileWriting(L.Callback):
    """After optimizer step ``step``, the checkpoint of that step kills the process while writing ``last.ckpt``
    (``step=<step>.ckpt`` is written first, so it is the newest complete checkpoint); once (``once`` marks it)."""

    def __init__(self, step: int, once: str) -> None:
        self.step, self.once = step, Path(once)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.once.exists():
            self.once.write_text("armed\n")
            _arm_kill_in_last_ckpt_write()


class PoisonAt(L.Callback):
    """After optimizer step ``step``, one weight of the UNet becomes NaN (a diverged step that got through)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.unet.conv_in.weight[0, 0, 0, 0] = float("nan")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_step_shards(tmp_path_factory.mktemp("safety_pairs") / "pairs", 4, 8)


def fit_config(root: Path, tiny_sd_folder: Path, pairs: Path, callbacks: list[dict] = ()) -> str:
    """The embedded reflow experiment on the tiny SD: 12 steps, a checkpoint every 4, no validation."""
    root.mkdir(parents=True, exist_ok=True)
    src = tiny_yaml("reflow.yaml", root, {
        "init": str(tiny_sd_folder), "export_dir": str(root / "export"), "lr": 1e-3, "warmup_steps": 2,
        "grid_steps": [1]},
        {"train": str(pairs), "val": str(pairs), "batch_size": 4, "num_workers": 0, "shuffle_buffer": 8},
        {"max_steps": STEPS, "val_check_interval": 1000, "limit_val_batches": 0, "log_every_n_steps": 4,
         "enable_progress_bar": False})
    cfg = yaml.safe_load(Path(src).read_text())
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if not c["class_path"].endswith("ImageGrid")]
    for c in cfg["trainer"]["callbacks"]:
        if c["class_path"].endswith("ModelCheckpoint"):
            c["init_args"].update(every_n_train_steps=EVERY, save_top_k=-1)
    cfg["trainer"]["callbacks"] += list(callbacks)
    Path(src).write_text(yaml.safe_dump(cfg))
    return src


def killed_run(root: Path, tiny_sd_folder: Path, pairs: Path, step: int = 10) -> tuple[str, Path]:
    """A fit killed with SIGKILL after step ``step`` (checkpoints at 4 and 8); its config and checkpoint folder."""
    cfg = fit_config(root, tiny_sd_folder, pairs, [{"class_path": "tests.lightning_modules.test_resume.KillAt",
                                                    "init_args": {"step": step, "signum": int(signal.SIGKILL),
                                                                  "once": str(root / "killed_once")}}])
    out = run_cli(cfg)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    return cfg, root / "ckpt" / "reflow.yaml"


def test_a_planted_last_ckpt_stops_the_rerun_and_a_cut_one_is_skipped(pairs, tiny_sd_folder, tmp_path):
    """One killed run (checkpoints at 4 and 8, last.ckpt = 8), rerun twice: first with a planted last.ckpt whose
    unpickling would run code (refused, naming it, and it never runs), then with last.ckpt cut by a kill during
    a truncating copy (skipped, saying why: the rerun resumes from step=8.ckpt)."""
    cfg, ckpts = killed_run(tmp_path, tiny_sd_folder, pairs)
    last = ckpts / "last.ckpt"
    good = last.read_bytes()
    assert load(last)["global_step"] == 8

    marker = tmp_path / "payload_ran"
    plant_file(last, marker)
    refused = run_cli(cfg)
    assert refused.returncode == 1, refused.stdout[-2000:] + refused.stderr[-3000:]
    assert f"[resume] {last} is not a plain checkpoint" in refused.stderr and "delete it" in refused.stderr
    assert not marker.exists()

    last.write_bytes(good[: len(good) // 3])
    resumed = run_cli(cfg)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"[resume] skipping {last}: " in resumed.stdout and "cannot be read" in resumed.stdout
    assert f"from step 8 ({ckpts / 'epoch=0-step=8.ckpt'})" in resumed.stdout
    assert load(last)["global_step"] == STEPS and (ckpts / "fit_finished.json").exists()


def test_a_kill_while_last_ckpt_is_written_leaves_a_checkpoint_to_resume_from(pairs, tiny_sd_folder, tmp_path):
    cfg = fit_config(tmp_path, tiny_sd_folder, pairs, [
        {"class_path": f"{__name__}.KillWhileWriting", "init_args": {"step": 8, "once": str(tmp_path / "once")}}])
    ckpts = tmp_path / "ckpt" / "reflow.yaml"
    killed = run_cli(cfg)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert load(ckpts / "last.ckpt")["global_step"] == 4  # the previous last.ckpt, whole

    resumed = run_cli(cfg)  # the same command again
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"from step 8 ({ckpts / 'epoch=0-step=8.ckpt'})" in resumed.stdout
    assert load(ckpts / "last.ckpt")["global_step"] == STEPS
    assert list(ckpts.glob(".last.ckpt.tmp-*")), "the kill did not fall inside the atomic write"


def test_a_checkpoint_with_nan_weights_is_not_written(pairs, tiny_sd_folder, tmp_path):
    from instaflow.resume.refusals import NonFiniteCheckpoint

    cfg = fit_config(tmp_path, tiny_sd_folder, pairs, [{"class_path": f"{__name__}.PoisonAt",
                                                       "init_args": {"step": 8}}])
    with pytest.raises(NonFiniteCheckpoint, match=r"step 8 .* holds NaN/inf in unet\.conv_in\.weight"):
        cli(["fit", "-c", BASE, "-c", cfg])
    ckpts = tmp_path / "ckpt" / "reflow.yaml"
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    assert load(ckpts / "last.ckpt")["global_step"] == 4


def test_an_explicit_ckpt_path_folder_with_planted_dcp_metadata_is_refused_before_lightning_reads_it(tmp_path):
    import pickle

    marker = tmp_path / "payload_ran"
    folder = dcp_folder(tmp_path / "last.ckpt")
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(SystemExit, match=r"--ckpt_path: .*\.metadata is not a plain checkpoint"):
        cli(["fit", "--experiment", "embedded/reflow", "--ckpt_path", str(folder)])
    assert not marker.exists()


def test_an_explicit_ckpt_path_file_that_names_code_is_refused(tmp_path):
    marker = tmp_path / "payload_ran"
    evil = plant_file(tmp_path / "step=500.ckpt", marker)
    with pytest.raises(SystemExit, match=f"--ckpt_path: {evil} is not a plain checkpoint"):
        cli(["fit", "--experiment", "embedded/reflow", "--ckpt_path", str(evil)])
    assert not marker.exists()


def test_the_atomic_io_survives_the_launchers_plugins_and_loads_weights_only_whatever_it_is_asked(tmp_path,
                                                                                                monkeypatch):
    """--trainer.plugins (the SLURM launcher's --no-requeue) replaces a YAML plugins list, not the CLI's IO; the IO
    reads weights-only even when asked otherwise and torch is told to by its environment variable."""
    from instaflow.resume.checkpoints import UnsafeCheckpoint
    from instaflow.tools import launch
    from lightning_modules.checkpointing import AtomicCheckpointIO
    from lightning_modules.cli import main

    c = main(["--experiment", "embedded/reflow", "--trainer.logger.init_args.save_dir", str(tmp_path),
              "--trainer.plugins", launch.NO_REQUEUE_PLUGIN], run=False)
    io = c.trainer.strategy.checkpoint_io
    assert isinstance(io, AtomicCheckpointIO)
    marker = tmp_path / "payload_ran"
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UnsafeCheckpoint):
        io.load_checkpoint(plant_file(tmp_path / "x.ckpt", marker), weights_only=False)
    assert not marker.exists()
