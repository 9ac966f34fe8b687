"""Exact resume on 2 ranks with DataLoader workers and a shuffle buffer: the resumed run is the uninterrupted one.

torchrun, 2 CPU ranks (gloo, DDP), 2 workers per rank, shuffle buffer on, validation in between: rank 0 is
killed with kill -9 after step 7; the rerun continues from the step-5 checkpoint (5 batches taken: the
restarted DataLoader's worker 0 must continue worker 1's stream) to step 10. Its final weights, EMA,
AdamW moments and LR schedule equal the uninterrupted run's bit for bit (same machine).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import yaml

from tests.lightning_modules.test_chain import BASE
from tests.lightning_modules.test_resume import assert_same_state, load, pairs, reflow_config, run_group  # noqa: F401

STEPS, EVERY, KILL = 10, 5, 7  # the last periodic checkpoint is the final state


def two_rank_config(root: Path, tiny_sd_folder: Path, pairs: Path, kill: bool) -> str:  # noqa: F811
    cfg = reflow_config(root, tiny_sd_folder, pairs, kill=(KILL, signal.SIGKILL) if kill else None)
    c = yaml.safe_load(Path(cfg).read_text())
    c["trainer"].update(max_steps=STEPS, val_check_interval=6, limit_val_batches=1, accelerator="cpu", devices=2,
                        strategy="ddp")
    c["data"]["init_args"].update(num_workers=2, shuffle_buffer=24, batch_size=4)
    for cb in c["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["every_n_train_steps"] = EVERY
    Path(cfg).write_text(yaml.safe_dump(c))
    return cfg


def torchrun(cfg: str) -> tuple[int, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "lightning_modules.cli", "fit", "-c", BASE, "-c", cfg]
    return run_group(cmd, env, timeout=600)


def test_a_killed_two_rank_run_with_workers_and_shuffle_resumes_bit_identical(pairs, tiny_sd_folder, tmp_path):  # noqa: F811
    rc, out = torchrun(two_rank_config(tmp_path / "whole", tiny_sd_folder, pairs, kill=False))
    assert rc == 0, out[-4000:]
    killed_cfg = two_rank_config(tmp_path / "killed", tiny_sd_folder, pairs, kill=True)
    rc, out = torchrun(killed_cfg)
    assert rc != 0
    ckpts = tmp_path / "killed" / "ckpt" / "reflow.yaml"
    assert load(ckpts / "last.ckpt")["global_step"] == EVERY
    rc, out = torchrun(killed_cfg)
    assert rc == 0, out[-4000:]
    assert f"from step {EVERY}" in out and "restarts with fresh streams" not in out, out[-4000:]

    whole = load(tmp_path / "whole" / "ckpt" / "reflow.yaml" / "last.ckpt")
    resumed = load(ckpts / "last.ckpt")
    assert whole["global_step"] == resumed["global_step"] == STEPS
    assert_same_state(resumed, whole)  # weights, AdamW moments, LR schedule, EMA: bit for bit
    # what made it exact is in the checkpoint: both ranks' stream positions and generators
    stream = resumed["CouplingDataModule"]["stream"]
    assert len(stream["ranks"]) == 2 and all(len(r["positions"]) == 2 for r in stream["ranks"])
    assert stream["ranks"][0]["batches"] == STEPS and resumed["training_rng"].shape[0] == 2
