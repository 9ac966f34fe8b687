"""FSDP2 checkpoint folders (``lightning_modules.checkpointing``) and the every-rank NaN check, with real kills.

- ``AtomicModelParallelStrategy`` writes a folder beside its target and swaps it in: a SIGKILL while
  a shard is written leaves the previous folder complete (fast: one process, no process group);
- it validates a folder before torch's DCP reader unpickles its ``.metadata``;
- a NaN in one rank's shard stops every rank at the checkpoint, naming it (2 gloo processes);
- slow: 2 FSDP2 ranks under torchrun, rank 0 killed while it overwrites ``last.ckpt``; the rerun
  resumes from the newest complete folder.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from instaflow.resume import checkpoints as ck
from tests.conftest import ROOT, free_port
from tests.lightning_modules.test_chain import BASE
from tests.lightning_modules.test_distributed import FSDP2, reflow_yaml, write_step_shards
from tests.lightning_modules.test_resume import run_group
from tests.resume.test_checkpoints import Payload, dcp_folder

SAVE = textwrap.dedent("""
    import os, signal, sys, warnings
    import torch
    warnings.simplefilter("ignore")
    from lightning_modules.checkpointing import AtomicModelParallelStrategy

    folder, step, kill = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "kill"
    real_fsync = os.fsync

    def fsync(fd):  # DCP fsyncs each shard once written: cut it in half and die there
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".distcp"):
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_fsync(fd)

    if kill:
        os.fsync = fsync
    state = {"unet.w": torch.full((256,), float(step))}
    optim = [{"state": {}, "param_groups": [{"lr": 0.1, "params": ["unet.w"]}]}]
    AtomicModelParallelStrategy().save_checkpoint(
        {"state_dict": state, "optimizer_states": optim, "global_step": step}, folder)
""")


def save_in_subprocess(folder: Path, step: int, kill: bool = False) -> int:
    return subprocess.run([sys.executable, "-c", SAVE, str(folder), str(step), "kill" if kill else "ok"],
                          cwd=ROOT, timeout=120).returncode


def save_here(folder: Path, step: int) -> None:
    """What ``SAVE`` does, in this process (one process, no process group: DCP warns that it saves alone)."""
    from lightning_modules.checkpointing import AtomicModelParallelStrategy

    optim = [{"state": {}, "param_groups": [{"lr": 0.1, "params": ["unet.w"]}]}]
    with pytest.warns(UserWarning):
        AtomicModelParallelStrategy().save_checkpoint(
            {"state_dict": {"unet.w": torch.full((256,), float(step))}, "optimizer_states": optim,
             "global_step": step}, folder)


def test_a_kill_while_a_folder_is_overwritten_keeps_the_previous_one_complete(tmp_path):
    folder = tmp_path / "last.ckpt"
    save_here(folder, 3)
    assert save_in_subprocess(folder, 9, kill=True) == -signal.SIGKILL
    assert ck.checkpoint_step(folder) == 3  # validated: metadata, every shard whole
    assert torch.equal(ck.read_checkpoint(folder)["state_dict"]["unet.w"], torch.full((256,), 3.0))
    leftover = list(tmp_path.glob(".last.ckpt.tmp-*"))
    assert len(leftover) == 1  # the killed write's half folder, beside the target

    save_here(folder, 12)  # the next save drops the dead writer's leftover
    assert ck.checkpoint_step(folder) == 12 and not leftover[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_the_strategy_validates_a_folder_before_torch_reads_its_metadata(tmp_path):
    from lightning_modules.checkpointing import AtomicModelParallelStrategy

    marker = tmp_path / "payload_ran"
    folder = dcp_folder(tmp_path / "last.ckpt")
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ck.UnsafeCheckpoint, match=r"\.metadata is not a plain checkpoint"):
        AtomicModelParallelStrategy().load_checkpoint(folder)
    assert not marker.exists()


NAN_WORKER = textwrap.dedent("""
    import sys, time
    import torch, torch.distributed as dist
    from callbacks.resume import Resume

    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2)

    class Trainer:
        global_step = 8

    shard = torch.tensor([1.0, float("nan")]) if rank == 1 else torch.ones(2)  # only rank 1's shard is bad
    t0 = time.time()
    try:
        Resume().on_save_checkpoint(Trainer(), None, {"global_step": 8, "state_dict": {"unet.w": shard}})
        print(f"rank {rank} saved", flush=True)
    except Exception as exn:
        print(f"rank {rank} raised {type(exn).__name__} after {time.time() - t0:.1f} s: {exn}", flush=True)
        dist.destroy_process_group()  # every rank raised here; an exit with a live gloo group can abort (-6)
        sys.exit(3)
    dist.destroy_process_group()
""")


def test_nan_in_one_ranks_shard_stops_every_rank_at_the_checkpoint():
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", NAN_WORKER, str(r), port], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [3, 3], outs
    assert "rank 1 raised NonFiniteCheckpoint" in outs[1] and "NaN/inf in unet.w" in outs[1]
    assert "rank 0 raised RankError" in outs[0] and "failed on rank 1" in outs[0] and "unet.w" in outs[0]
    for out in outs:
        assert float(out.split(" after ")[1].split(" s:")[0]) < 60


class KillInFolderWrite(L.Callback):
    """After step ``step``, rank 0 kills itself (SIGKILL) while it writes its shard of ``last.ckpt`` (in place, or
    in the temporary folder beside it), once (``once`` marks it)."""

    def __init__(self, step: int, once: str) -> None:
        self.step, self.once = step, Path(once)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step or trainer.global_rank != 0 or self.once.exists():
            return
        self.once.write_text("armed\n")
        real_fsync = os.fsync

        def fsync(fd):
            p = Path(os.readlink(f"/proc/self/fd/{fd}"))
            if p.suffix == ".distcp" and (p.parent.name == "last.ckpt" or p.parent.name.startswith(".last.ckpt.tmp-")):
                os.ftruncate(fd, os.fstat(fd).st_size // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            return real_fsync(fd)

        os.fsync = fsync


@pytest.mark.slow
def test_fsdp2_killed_while_overwriting_last_ckpt_resumes_from_the_newest_complete_folder(tiny_sd_folder, tmp_path):
    """torchrun, 2 CPU ranks, FSDP2 with distributed checkpoints every 3 steps: rank 0 dies while writing
    last.ckpt at step 6 (after step=6's folder); the same command again resumes both ranks from step 6."""
    pairs = write_step_shards(tmp_path / "pairs", 9, 8)
    cfg = reflow_yaml(tmp_path, tiny_sd_folder, pairs, "fsdp", max_steps=9)
    c = yaml.safe_load(Path(cfg).read_text())
    c["trainer"]["callbacks"].append({"class_path": f"{__name__}.KillInFolderWrite",
                                      "init_args": {"step": 6, "once": str(tmp_path / "once")}})
    Path(cfg).write_text(yaml.safe_dump(c))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "lightning_modules.cli", "fit", "-c", BASE, "-c", cfg, "-c", FSDP2,
           "--trainer.strategy.init_args.data_parallel_size", "2", "--model.init_args.fsdp_mixed_precision", "null",
           "--trainer.accelerator", "cpu", "--trainer.devices", "2"]
    rc, out = run_group(cmd, env, timeout=600)
    assert rc != 0 and (tmp_path / "once").exists(), out[-3000:]
    ckpts = tmp_path / "fsdp" / "ckpt" / "reflow.yaml"
    assert ck.checkpoint_step(ckpts / "last.ckpt") == 3  # the previous folder, complete
    assert ck.checkpoint_step(ckpts / "epoch=0-step=6.ckpt") == 6

    t0 = time.time()
    rc, out = run_group(cmd, env, timeout=600)
    assert rc == 0, out[-4000:]
    assert f"from step 6 ({ckpts / 'epoch=0-step=6.ckpt'})" in out, out[-4000:]
    assert ck.checkpoint_step(ckpts / "last.ckpt") == 9 and time.time() - t0 < 600
