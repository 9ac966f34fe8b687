"""Launching the rehearsal's runs: the sd15 recipe's own stage YAMLs (a family's files extend them) on tiny models,
4 CPU ranks under torchrun, shards shared by the ranks in one tmp folder.

What a rehearsal config changes in the recipe, and why (everything else is the recipe's: its callbacks,
quality callback with best-k checkpoints and export, EMA, image grid, gradient clipping, schedule shape):

- models: a tiny one of the family (``init``), ``lr`` 1e-3 and 2 warm-up steps (a few steps must move it);
- hardware: ``accelerator: cpu``, ``devices: 4``, ``num_nodes: 1``, the recipe's own DDP strategy (gloo), ``precision:
  32-true`` (CPU ranks), ``accumulate_grad_batches: 1``; OMP_NUM_THREADS=1 per rank;
- length: ``STEPS`` steps, a periodic checkpoint every ``EVERY``, validation (1 batch) every ``VAL_EVERY``;
- the quality callback: 4 prompts of the tiny world's val shard and a tiny fixed feature network for the FID
  (COCO and Inception cannot be downloaded here), no CLIP score; its monitored FID still picks the best-2;
- data: per-rank batch 2, 1 loader worker, a shuffle buffer of 8, over ``SHARDS`` coupling shards in one folder
  that every rank reads (shared storage).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from instaflow.experiments import resolved
from tests.conftest import ROOT

BASE = str(ROOT / "experiments" / "base" / "default.yaml")
RANKS, STEPS, EVERY, VAL_EVERY, BATCH, SHARDS = 4, 12, 4, 6, 2, 8

# the recipe's stage files: sd15's own, and each family's (which extend sd15's)
RECIPE = {"sd": {"reflow": "sd15/reflow_part1", "distill": "sd15/distill_part1"},
          **{f: {"reflow": f"{f}/reflow", "distill": f"{f}/distill"} for f in ("sdxl", "sd3", "flux", "sana")}}
FOLDER_FIXTURE = {"sd": "tiny_sd_folder", "sdxl": "tiny_sdxl_folder", "sd3": "tiny_sd3_folder",
                  "flux": "tiny_flux_folder", "sana": "tiny_sana_folder"}


def write_couplings(folder: Path, shards: int = SHARDS, per_shard: int = RANKS * BATCH) -> Path:
    """Coupling shards (x0 stored, distinct captions and latents), one folder that every rank reads."""
    from tests.lightning_modules.test_distributed import write_step_shards

    return write_step_shards(folder, shards, per_shard)


def recipe_config(root: Path, family: str, stage: str, model_folder: Path, couplings: Path, val_shards: str, *,
                  faults: list[dict] = (), model: dict | None = None, data: dict | None = None,
                  trainer: dict | None = None) -> Path:
    """The recipe's ``stage`` file for ``family``, merged with its chain, made tiny (see the module docstring);
    ``faults``: callbacks appended to the recipe's (``{"class_path": ..., "init_args": ...}``)."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = resolved(RECIPE[family][stage])
    t = cfg["trainer"]
    assert "ddp" in str(t.get("strategy")), t.get("strategy")  # the recipe's own DDP (restart-invariant buckets)
    t.update({"accelerator": "cpu", "devices": RANKS, "num_nodes": 1, "precision": "32-true",
              "accumulate_grad_batches": 1, "max_steps": STEPS, "val_check_interval": VAL_EVERY,
              "limit_val_batches": 1, "log_every_n_steps": 2, "enable_progress_bar": False,
              "default_root_dir": str(root / "root")})
    t["logger"]["init_args"]["save_dir"] = str(root / "runs")
    for cb in t["callbacks"]:
        name = cb["class_path"].rsplit(".", 1)[1]
        args = cb.setdefault("init_args", {})
        if name == "ModelCheckpoint" and not args.get("monitor"):
            args["every_n_train_steps"] = EVERY
        elif name == "ImageGrid":
            args["prompts"] = args["prompts"][:2]
        elif name == "Quality":
            args.update({"prompts": {"class_path": "instaflow.evaluation.quality.ShardPrompts",
                                     "init_args": {"shards": val_shards, "n": 4, "resolution": 16}},
                         "features": {"class_path": "tests.callbacks.test_quality.TinyFeatures"},
                         "scores": [], "batch_size": 4, "bf16": False})
    t["callbacks"] += [dict(f) for f in faults]
    t.update(trainer or {})
    m = cfg["model"]["init_args"]
    m.update({"init": str(model_folder), "export_dir": str(root / "export"), "lr": 1e-3, "warmup_steps": 2})
    if "grid_steps" in m:
        m["grid_steps"] = [1]
    if family == "flux":
        m["resolution"] = 16  # the tiny FLUX's images (the recipe's 1024 px would be 64x64 latents)
    m.update(model or {})
    d = cfg["data"]["init_args"]
    d.update({"train": str(couplings), "val": str(couplings), "batch_size": BATCH, "num_workers": 1,
              "shuffle_buffer": 8})
    d.update(data or {})
    out = root / f"rehearsal_{family}_{stage}.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
            "PYTHONFAULTHANDLER": "1"}  # a rank that crashes in C prints its Python stack


def torchrun_cmd(config: Path, *extra: str) -> list[str]:
    """The real CLI on ``RANKS`` CPU ranks through torchrun (no restarts: a failed rank ends the job)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(RANKS),
            "--max-restarts", "0", "-m", "lightning_modules.cli", "fit", "-c", BASE, "-c", str(config), *extra]


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (torchrun starts each worker in a session of its own, so the job's process
    group alone does not reach them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Job:
    """A torchrun job in its own process group (a scheduler's job): its return code, output (also in ``log``) and
    wall time, and every process it started (``pids``, sampled while it ran). The job and everything below it are
    killed when it runs past ``timeout``."""

    def __init__(self, config: Path, timeout: float = 240, *extra: str, log: Path | None = None) -> None:
        log = log or config.with_suffix(f".{time.time_ns()}.log")
        self.pids: set[int] = set()
        start = time.monotonic()
        with open(log, "w") as f:
            proc = subprocess.Popen(torchrun_cmd(config, *extra), cwd=ROOT, env=env(), stdout=f,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
            self.pid = proc.pid
            while proc.poll() is None:
                self.pids |= descendants(proc.pid)
                if time.monotonic() - start > timeout:
                    for p in [proc.pid, *descendants(proc.pid), *self.pids]:
                        try:
                            os.kill(p, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    proc.wait()
                    raise AssertionError(f"the job ran past {timeout:.0f} s and was killed: "
                                         f"...{log.read_text()[-4000:]}")
                time.sleep(0.2)
        self.seconds, self.rc, self.ended = time.monotonic() - start, proc.returncode, time.time()
        self.out = log.read_text()
        # processes of the job still running 15 s after it ended (torchrun waits for its workers only: a worker's
        # DataLoader workers notice their parent's death within a few seconds)
        deadline = time.monotonic() + 15
        while (left := sorted(p for p in self.pids if alive(p))) and time.monotonic() < deadline:
            time.sleep(0.5)
        self.left = left

    def tail(self, n: int = 5000) -> str:
        return f"rc {self.rc}, {self.seconds:.0f} s: ...{self.out[-n:]}"


def run_dir(root: Path) -> Path:
    """The run's logger folder (its checkpoints are in ``checkpoints/``, the recipe sets no dirpath)."""
    runs = sorted((root / "runs").glob("*/version_*"))
    assert len(runs) == 1, runs
    return runs[0]


def load(path: Path) -> dict:
    """A checkpoint this test's own run wrote (trusted: written by this process tree)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def ema_shadow(ckpt: dict) -> list[torch.Tensor]:
    return next(v for k, v in ckpt["callbacks"].items() if k.startswith("EMA"))["shadow"]


def all_finite(ckpt: dict) -> bool:
    tensors = [v for v in ckpt["state_dict"].values() if torch.is_tensor(v)] + list(ema_shadow(ckpt))
    for opt in ckpt.get("optimizer_states", []):
        for st in opt["state"].values():
            tensors += [v for v in st.values() if torch.is_tensor(v)]
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def export_finite(folder: Path) -> bool:
    from safetensors.torch import load_file

    files = list(folder.rglob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    return all(torch.isfinite(v).all() for f in files for v in load_file(str(f)).values() if v.is_floating_point())
