"""Rehearsal: the sd15 recipe's coupling stage on 4 CPU ranks, SIGKILLed at random times and rerun.

``experiments/sd15/pairs_teacher.yaml`` itself (its caption filters, its writer with fp16 latents, the bf16
UNet, 25-step DPM-Solver++ with guidance 5), pointed at the tiny SD, a 16-shard shapes world, batch 4, one
loader worker and temporary folders, launched the way a cluster launches it:
``torch.distributed.run --standalone --nproc-per-node 4`` (gloo, CPU, OMP_NUM_THREADS=1).

Run A goes through uninterrupted. Run B is the same command killed twice in a row (seeded: one random rank
SIGKILLed, which the launcher answers by stopping the others; then every process of the job at once, a
node that dies), each kill after a random number of newly completed shards plus a random delay, and then
rerun to completion. B must end with every prompt of the input exactly once and every coupling
byte-identical to A's, shard files included: an output shard is one input shard's samples in key order
with mtime-0 tar headers (``data.couplings``), written by the rank that owns the input shard in every run
(``data.laion`` splits before it skips completed shards), and each sample's noise comes from its key.
Shards of 5 prompts in batches of 4 straddle shards, so a rerun that skips completed shards groups the
prompts into other batches than run A did; equal bytes also show that no coupling depends on its batch
neighbours.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.rehearsal.report import scenario

pytestmark = pytest.mark.rehearsal

RANKS = 4
SHARDS, PER_SHARD, BATCH = 16, 5, 4  # 4 shards a rank; batches straddle shards (5 is no multiple of 4)
KILLS = ("rank", "job")  # what each killed attempt loses, in order: one random rank, then every process
SEED = 26
RUN_TIMEOUT_S = 150  # one launch; a hang past it fails the test (and every process of the job is killed)
BOUND_S = 360  # the whole scenario (run A, two killed attempts, the final rerun): 198-211 s on 2 cores under load 8-10


def sd15_tiny(tmp: Path, sd: Path, world: str, out: Path) -> Path:
    """experiments/sd15/pairs_teacher.yaml (its whole chain, merged) on the tiny SD, the tiny world, 4 CPU ranks."""
    from instaflow.experiments import resolved

    cfg = resolved("sd15/pairs_teacher")
    cfg["trainer"].update(accelerator="cpu", devices=RANKS, num_nodes=1, default_root_dir=str(tmp / "root"))
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp / "runs")
    (writer,) = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith(".CouplingWriter")]
    writer["init_args"]["output_dir"] = str(out)
    cfg["model"]["init_args"]["model"] = str(sd)
    cfg["data"]["init_args"].update(predict=world, resolution=16, eval_batch_size=BATCH, num_workers=1)
    path = tmp / f"sd15_pairs_teacher_{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Job:
    """``torch.distributed.run --standalone --nproc-per-node 4 -m lightning_modules.cli predict -c CFG``.

    The launcher starts each rank in a session of its own (``start_new_session``), so a process group kill
    reaches the launcher alone and leaves the ranks running, orphaned. The job's processes (launcher, ranks,
    their loader workers) are therefore collected while the launcher lives and killed one by one.
    """

    def __init__(self, cfg: Path, log: Path) -> None:
        import psutil

        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(RANKS),
               "-m", "lightning_modules.cli", "predict", "-c", str(cfg)]
        self.log = log
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.started = time.monotonic()
        self.procs = {self.proc.pid: psutil.Process(self.proc.pid)}

    def tree(self) -> list:
        """The job's live processes; every one seen so far is remembered (psutil tells a reused pid apart)."""
        import psutil

        try:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                self.procs.setdefault(p.pid, p)
        except psutil.Error:
            pass
        return [p for p in self.procs.values() if _alive(p)]

    def ranks(self) -> dict[int, int]:
        """rank -> pid of the launcher's workers (their loader workers inherit RANK too: take the launcher's children)."""
        import psutil

        out = {}
        for child in psutil.Process(self.proc.pid).children():
            try:
                rank = child.environ().get("RANK")
            except psutil.Error:
                continue
            if rank is not None:
                out[int(rank)] = child.pid
        return out

    def kill(self) -> None:
        """SIGKILL every process of the job at once (a node that dies), then reap the launcher."""
        import psutil

        procs = self.tree()
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        self.proc.wait()  # the launcher is reaped here, by Popen, which keeps its exit status
        psutil.wait_procs([p for p in procs if p.pid != self.proc.pid], timeout=30)

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            self.tree()
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"a run hung past {timeout:.0f} s:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.05)
        return self.proc.returncode


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def finish(job: Job) -> None:
    try:
        rc = job.wait()
    finally:
        job.kill()  # nothing of it outlives it
    assert rc == 0, f"exit {rc}:\n{job.log.read_text()[-6000:]}"


def complete(out: Path) -> set[str]:
    from data.couplings import is_complete

    return {p.name for p in out.glob("*.tar") if is_complete(p)}


def killed_attempt(cfg: Path, out: Path, log: Path, rng: random.Random, victim: str) -> dict:
    """Launch, wait for a random number of newly completed shards and a random delay, SIGKILL ``victim``
    (one random rank, or the whole job); returns what happened."""
    before = complete(out)
    wait_for = rng.randint(1, max(1, (SHARDS - len(before)) // 3))  # leaves shards to do: the kill lands mid-run
    delay = rng.uniform(0.0, 0.5)
    job = Job(cfg, log)
    try:
        while len(complete(out) - before) < wait_for and job.proc.poll() is None:
            job.tree()
            assert time.monotonic() < job.started + RUN_TIMEOUT_S, f"no progress:\n{log.read_text()[-4000:]}"
            time.sleep(0.05)
        time.sleep(delay)
        killed_at = time.monotonic() - job.started
        if victim == "rank":
            ranks = job.ranks()
            victim = f"rank {(rank := rng.choice(sorted(ranks)))}" if ranks else "none (the run had ended)"
            if ranks:
                os.kill(ranks[rank], signal.SIGKILL)  # the launcher sees it and stops the other ranks
            rc = job.wait()
        else:
            job.kill()  # the node dies: launcher, ranks and loader workers at once
            rc = job.proc.returncode
    finally:
        job.kill()
    assert job.tree() == [], "a process of the killed job outlived it"
    return {"victim": victim, "after_new_shards": wait_for, "plus_s": round(delay, 2),
            "killed_at_s": round(killed_at, 1), "rc": rc, "complete_before": len(before),
            "complete_after": len(complete(out)), "regrouped": regrouped(before),
            "temporaries_left": len([p for p in out.iterdir() if p.name.startswith(".")])}


def regrouped(done: set[str]) -> bool:
    """Whether a run that skips the ``done`` shards puts some prompts into other batches than an uninterrupted run
    (each rank's one loader worker reads its shards ``[r::RANKS]`` in order, batching across shard ends)."""
    for r in range(RANKS):
        mine = [f"{i:05d}.tar" for i in range(SHARDS)][r::RANKS]
        todo = [name for name in mine if name not in done]
        if any((mine.index(name) - j) * PER_SHARD % BATCH for j, name in enumerate(todo)):
            return True
    return False


def members(folder: Path) -> tuple[Counter, dict[str, dict[str, bytes]]]:
    """(how many times each key occurs over the folder's shards, key -> {member suffix: bytes})."""
    seen, out = Counter(), {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys = set()
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                keys.add(key)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
            seen.update(keys)
    return seen, out


def test_coupling_generation_killed_at_random_on_four_ranks_ends_exact(tiny_sd_folder, tmp_path):
    """Killed twice at random and rerun, the sd15 coupling stage ends with every prompt exactly once and the same
    bytes (members, shard files, completion marks but their time) as the uninterrupted run."""
    from data.laion import LaionStream
    from data.shapes import brace_pattern, write_split
    from instaflow.experiments import resolved

    write_split(tmp_path / "world", "train", SHARDS * PER_SHARD, samples_per_shard=PER_SHARD, seed=0, resolution=16,
                progress=False)
    world = brace_pattern(tmp_path / "world" / "train", SHARDS)
    filters = resolved("sd15/pairs_teacher")["data"]["init_args"]["filters"]
    expected = sorted(s["key"] for s in LaionStream(world, captions_only=True, filters=filters))
    assert len(expected) == SHARDS * PER_SHARD  # the shapes world's metadata passes the recipe's filters

    a, b = tmp_path / "A", tmp_path / "B"
    rng = random.Random(SEED)
    with scenario("couplings killed at random", family="sd", bound_s=BOUND_S,
                  expected="every prompt's coupling exactly once, byte-identical to an uninterrupted run"):
        t0 = time.monotonic()
        finish(Job(sd15_tiny(tmp_path, tiny_sd_folder, world, a), tmp_path / "A.log"))
        seconds_a = time.monotonic() - t0

        cfg_b = sd15_tiny(tmp_path, tiny_sd_folder, world, b)
        kills = [killed_attempt(cfg_b, b, tmp_path / f"B{i}.log", rng, victim) for i, victim in enumerate(KILLS)]
        print(f"run A {seconds_a:.1f} s; kills: {json.dumps(kills)}")
        (tmp_path / "kills.json").write_text(json.dumps(kills))
        assert all(k["rc"] != 0 for k in kills), kills  # each attempt was cut, not finished before its kill
        assert kills[-1]["complete_after"] < SHARDS, kills  # the final rerun has work left
        assert regrouped(complete(b)) or any(k["regrouped"] for k in kills), kills
        finish(Job(cfg_b, tmp_path / "B_final.log"))

        seen_a, got_a = members(a)
        seen_b, got_b = members(b)
        assert sorted(seen_a) == expected and set(seen_a.values()) == {1}
        assert sorted(seen_b) == expected, sorted(set(expected) ^ set(seen_b))
        assert [k for k, n in seen_b.items() if n != 1] == []  # no prompt twice
        for key in expected:  # every member: caption, generation json (seed), x1 latent
            assert got_b[key].keys() == got_a[key].keys() and {"txt", "json", "x1.npy"} <= got_a[key].keys(), key
            for ext in got_a[key]:
                assert got_b[key][ext] == got_a[key][ext], f"{key}.{ext} differs from the uninterrupted run"
        # the shard files too: same samples, key order, mtime-0 headers (data.shards.write_tar)
        assert sorted(p.name for p in b.glob("*.tar")) == sorted(p.name for p in a.glob("*.tar"))
        for shard in sorted(a.glob("*.tar")):
            assert (b / shard.name).read_bytes() == shard.read_bytes(), shard.name
        for mark in sorted(a.glob("*_stats.json")):  # same keys by the same rank; only the time differs
            ma, mb = json.loads(mark.read_text()), json.loads((b / mark.name).read_text())
            assert {**mb, "written_at": 0} == {**ma, "written_at": 0}, mark.name
        assert [p.name for p in b.iterdir() if p.name.startswith(".")] == []  # killed writers' temporaries removed
        assert json.loads((b / "generation.json").read_text()) == json.loads((a / "generation.json").read_text())
