"""The rehearsal's training faults (issue 26): the sd15 recipe's stages on tiny models of each family, 4 CPU ranks
under torchrun, one fault per scenario, each with its own time bound and the ending a user needs.

``make rehearsal`` runs them all; ``make test`` runs the ``rehearsal_quick`` ones. The table of faults, endings and
measured seconds is docs/rehearsal.md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from tests.rehearsal.harness import (EVERY, RANKS, STEPS, Job, all_finite, ema_shadow, export_finite, load,
                                     recipe_config, run_dir, write_couplings)
from tests.rehearsal.report import scenario

pytestmark = pytest.mark.rehearsal

FAULTS = "tests.rehearsal.faults"


@pytest.fixture(scope="module")
def couplings(tmp_path_factory) -> Path:
    return write_couplings(tmp_path_factory.mktemp("rehearsal_shared") / "couplings")


def checkpoints(root: Path) -> Path:
    return run_dir(root) / "checkpoints"


@pytest.mark.rehearsal_quick
def test_rank_0_raising_in_validation_ends_every_rank_naming_it(couplings, tiny_world, tiny_sd_folder, tmp_path):
    message = "rehearsal: rank 0 failed in validation"
    cfg = recipe_config(tmp_path, "sd", "reflow", tiny_sd_folder, couplings, tiny_world.val, faults=[
        {"class_path": f"{FAULTS}.RaiseInValidation", "init_args": {"message": message, "once": str(tmp_path / "once")}}])
    with scenario("rank 0 raises in validation", "every rank exits nonzero within 60 s naming the error", 240,
                  family="sd"):
        job = Job(cfg)
        raised = float((tmp_path / "once").read_text())
        assert job.rc != 0, job.tail()
        assert f"RuntimeError: {message}" in job.out, job.tail()
        assert job.ended - raised < 60, f"the job ended {job.ended - raised:.0f} s after rank 0 raised"
        assert job.left == [], f"processes of the job still run after it ended: {job.left}"
        assert "Root Cause" in job.out and "rank      : 0 (local_rank: 0)" in job.out.split("Root Cause", 1)[1]
        # no rank trained on: nothing after the validation step was checkpointed, and nothing was exported
        assert not (tmp_path / "export").exists()


def test_a_rank_killed_inside_a_checkpoint_write_reruns_from_the_newest_whole_checkpoint(couplings, tiny_world,
                                                                                       tiny_sdxl_folder, tmp_path):
    cfg = recipe_config(tmp_path, "sdxl", "reflow", tiny_sdxl_folder, couplings, tiny_world.val, faults=[
        {"class_path": f"{FAULTS}.KillWhileWritingOn", "init_args": {"step": 2 * EVERY, "once": str(tmp_path / "once")}}])
    with scenario("SIGKILL inside a checkpoint write", f"the rerun resumes from step {2 * EVERY} and finishes", 360,
                  family="sdxl"):
        killed = Job(cfg)
        assert killed.rc != 0 and "exitcode  : -9" in killed.out, killed.tail()  # rank 0 died by SIGKILL
        assert killed.left == [], f"processes of the killed job still run: {killed.left}"
        ckpts = checkpoints(tmp_path)
        assert list(ckpts.glob(".last.ckpt.tmp-*")), "the kill did not fall inside the atomic write"
        assert load(ckpts / "last.ckpt")["global_step"] == EVERY  # the previous last.ckpt, whole
        rerun = Job(cfg)  # the same command again
        assert rerun.rc == 0, rerun.tail()
        assert f"from step {2 * EVERY} ({ckpts / f'epoch=0-step={2 * EVERY}.ckpt'})" in rerun.out, rerun.tail()
        assert load(ckpts / "last.ckpt")["global_step"] == STEPS and (ckpts / "fit_finished.json").exists()
        assert (tmp_path / "export" / "model_index.json").exists()


NAN_STEP, NAN_RANK = EVERY + 1, 2  # after the first checkpoint: a NaN must not reach the next one


@pytest.mark.parametrize("setting", ["skip", "stop"])
def test_a_nan_gradient_on_one_rank_is_skipped_on_every_rank_or_stops_the_run(setting, couplings, tiny_world,
                                                                              tiny_sd3_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cfg = recipe_config(tmp_path, "sd3", "distill", tiny_sd3_folder, couplings, tiny_world.val,
                        model={"nonfinite": setting}, faults=[
        {"class_path": "tests.lightning_modules.test_nonfinite.InjectNaN",
         "init_args": {"steps": [NAN_STEP], "out": str(out), "rank": NAN_RANK, "world": RANKS}}])
    expected = (f"step {NAN_STEP} skipped on all {RANKS} ranks and counted once, run finishes" if setting == "skip"
                else f"every rank stops naming step {NAN_STEP}")
    with scenario(f"NaN gradient on rank {NAN_RANK} ({setting})", expected + "; no NaN saved", 300, family="sd3"):
        job = Job(cfg)
        assert (out / f"inject_rank{NAN_RANK}.txt").exists(), job.tail()
        ckpts = sorted(checkpoints(tmp_path).glob("*.ckpt"))
        assert ckpts and all(all_finite(load(p)) for p in ckpts), [p.name for p in ckpts]
        if setting == "skip":
            assert job.rc == 0, job.tail()
            assert f"[nonfinite] skipped step {NAN_STEP}" in job.out
            for r in range(RANKS):
                rec = torch.load(out / f"rank{r}.pt")
                assert rec["skipped"] == 1 and rec["global_step"] == STEPS, (r, rec["skipped"], rec["global_step"])
                snaps = rec["snapshots"]
                assert torch.equal(snaps[NAN_STEP], snaps[NAN_STEP - 1]), r  # the step was not applied on rank r
            last = load(checkpoints(tmp_path) / "last.ckpt")
            assert last["nonfinite_steps_skipped"] == 1 and last["global_step"] == STEPS
            assert export_finite(tmp_path / "export")
        else:
            assert job.rc != 0, job.tail()
            assert f"non-finite loss or gradient at step {NAN_STEP} (nonfinite: stop)" in job.out, job.tail()
            for r in range(RANKS):
                said = out / f"error_rank{r}.txt"
                assert said.exists() and f"step {NAN_STEP}" in said.read_text(), (r, job.tail())
            assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("setting", ["skip", "error"])
def test_a_shard_deleted_mid_epoch_is_counted_and_skipped_or_ends_the_job_naming_it(setting, couplings, tiny_world,
                                                                                   tiny_flux_folder, tmp_path):
    # small training shards (2 samples): every batch opens a shard, so the ranks reach for the deleted one within a
    # step or two; validation reads the 8 shared shards (a finite pass splits shards over ranks: 2 would not do)
    shards = write_couplings(tmp_path / "shared", shards=2, per_shard=2)
    gone = shards / "00001.tar"
    cfg = recipe_config(tmp_path, "flux", "distill", tiny_flux_folder, shards, tiny_world.val,
                        data={"missing_shards": setting, "val": str(couplings)}, faults=[
        {"class_path": f"{FAULTS}.DeleteShardAt",
         "init_args": {"step": 2, "shard": str(gone), "once": str(tmp_path / "once"), "rank": 1}}])
    expected = ("the run finishes, the skip counted as missing_shard" if setting == "skip"
                else "the job ends with an error naming the shard")
    with scenario(f"shard deleted mid-epoch ({setting})", expected, 300, family="flux"):
        job = Job(cfg)
        assert not gone.exists(), job.tail()
        if setting == "skip":
            assert job.rc == 0, job.tail()
            assert f"(missing_shard, 1 so far): {gone}" in job.out, job.tail()
            assert (checkpoints(tmp_path) / "fit_finished.json").exists()
        else:
            assert job.rc != 0, job.tail()
            assert f"shard {gone} does not exist" in job.out, job.tail()
        assert job.left == [], f"processes of the job still run: {job.left}"


def test_a_stale_run_marker_naming_a_reused_pid_does_not_stop_the_rerun(couplings, tiny_world, tiny_sana_folder,
                                                                        tmp_path):
    from instaflow.resume.marks import RUNNING, running_mark

    cfg = recipe_config(tmp_path, "sana", "reflow", tiny_sana_folder, couplings, tiny_world.val, faults=[
        {"class_path": f"{FAULTS}.KillRankAt", "init_args": {"step": EVERY + 2, "once": str(tmp_path / "once")}}])
    with scenario("stale run marker, pid reused", f"the rerun resumes from step {EVERY} and finishes", 360,
                  family="sana"):
        killed = Job(cfg)  # the node died: rank 0 killed, its marker left behind
        assert killed.rc != 0, killed.tail()
        ckpts = checkpoints(tmp_path)
        assert (ckpts / RUNNING).exists() and load(ckpts / "last.ckpt")["global_step"] == EVERY
        # the restarted node runs another process under the marker's pid: a live `sleep`, started at another time
        # (and, as after a reboot, in another boot)
        sleep = subprocess.Popen(["sleep", "300"])
        try:
            mark = {**running_mark(sleep.pid), "start_ticks": running_mark(sleep.pid)["start_ticks"] - 100,
                    "boot_id": "0" * 36}
            (ckpts / RUNNING).write_text(json.dumps(mark))
            rerun = Job(cfg)
        finally:
            sleep.kill()
            sleep.wait()
        assert rerun.rc == 0, rerun.tail()
        assert f"[resume] continuing {run_dir(tmp_path)} from step {EVERY}" in rerun.out, rerun.tail()
        assert (ckpts / "fit_finished.json").exists() and not (ckpts / RUNNING).exists()
        assert load(ckpts / "last.ckpt")["global_step"] == STEPS


TERM_STEP = EVERY + 2  # between two periodic checkpoints


def _stream_and_draws_equal(a: dict, b: dict) -> None:
    """What the checkpoint restores is exact on any number of ranks: every rank's stream position and generator."""
    assert a["global_step"] == b["global_step"]
    assert a["CouplingDataModule"] == b["CouplingDataModule"], "stream positions differ"
    assert torch.equal(a["training_rng"], b["training_rng"]), "training generators differ"


def _tensors(ckpt: dict) -> dict[str, torch.Tensor]:
    out = {f"weights {k}": v for k, v in ckpt["state_dict"].items()}
    out.update({f"EMA {i}": v for i, v in enumerate(ema_shadow(ckpt))})
    for n, st in ckpt["optimizer_states"][0]["state"].items():
        out.update({f"AdamW {k} {n}": st[k] for k in ("exp_avg", "exp_avg_sq")})
    return out


def _largest_relative_difference(a: dict, b: dict) -> float:
    """max over tensors of |a - b| / |b| (L2): 0.0 when the resumed run is the uninterrupted one bit for bit."""
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    return max(float((ta[k].double() - tb[k].double()).norm() / tb[k].double().norm().clamp_min(1e-30)) for k in ta)


@pytest.mark.parametrize("strategy", ["ddp", "ddp_find_unused_parameters_true"])
def test_sigterm_to_the_job_saves_the_current_step_and_the_rerun_equals_the_uninterrupted_run(
        strategy, couplings, tiny_world, tiny_sd_folder, tmp_path):
    """The recipe's ``ddp``: streams and draws exact, weights within all-reduce rounding (DDP rebuilds its gradient
    buckets after a job's first step, so on 4 ranks the resumed job's first step sums in another order);
    ``ddp_find_unused_parameters_true`` never rebuilds them: bit for bit."""
    exact = strategy != "ddp"
    full_cfg = recipe_config(tmp_path / "full", "sd", "distill", tiny_sd_folder, couplings, tiny_world.val,
                             trainer={"strategy": strategy})
    cfg = recipe_config(tmp_path / "term", "sd", "distill", tiny_sd_folder, couplings, tiny_world.val, faults=[
        {"class_path": f"{FAULTS}.TermJobAt", "init_args": {"step": TERM_STEP, "once": str(tmp_path / "once")}}],
        trainer={"strategy": strategy})
    ending = ("bit-identical to the uninterrupted run (weights, EMA, AdamW)" if exact else
              "streams and draws identical, weights/EMA/AdamW within 1e-4 relative of the uninterrupted run")
    expected = f"last.ckpt at step {TERM_STEP} or {TERM_STEP + 1}, agreed by every rank; the rerun ends {ending}"
    with scenario(f"SIGTERM to the job ({strategy})", expected, 480,
                  family="sd"):
        full = Job(full_cfg)
        assert full.rc == 0, full.tail()
        stopped = Job(cfg)
        # torchrun itself ends with 1 (its SignalException), not 143: the workers' 143 is in its failure summary
        assert stopped.rc != 0, stopped.tail()
        assert stopped.left == [], f"processes of the stopped job still run: {stopped.left}"
        ckpts = checkpoints(tmp_path / "term")
        # the ranks agree on the stop at a step end (callbacks.resume); the signal reaches them during step
        # TERM_STEP's end or the next step, so the agreed step is one of the two, the same on every rank
        saved = load(ckpts / "last.ckpt")["global_step"]
        assert saved in (TERM_STEP, TERM_STEP + 1), saved
        assert f"[resume] SIGTERM: saved step {saved}" in stopped.out, stopped.tail()
        rerun = Job(cfg)
        assert rerun.rc == 0, rerun.tail()
        assert f"from step {saved}" in rerun.out, rerun.tail()
        assert (ckpts / "fit_finished.json").exists() and (tmp_path / "term" / "export" / "model_index.json").exists()
        resumed, whole = load(ckpts / "last.ckpt"), load(checkpoints(tmp_path / "full") / "last.ckpt")
        _stream_and_draws_equal(resumed, whole)
        apart = _largest_relative_difference(resumed, whole)
        print(f"[rehearsal] {strategy}: largest relative difference to the uninterrupted run {apart:.3g}")
        assert apart == 0.0 if exact else apart < 1e-4, apart
