"""Distributed correctness on CPU (gloo): DDP and FSDP2 match one process, sharded resume, 2-rank couplings.

Multi-process Lightning re-executes its launching script, so the 2-process runs are subprocesses of
``python -m lightning_modules.cli``; their losses are read back from TensorBoard event files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, IterableDataset

from tests.conftest import ROOT, reference_and_sharded
from tests.lightning_modules.test_chain import BASE, cli, dead_writers_temporary, read_pairs, tiny_yaml

FSDP2 = str(ROOT / "experiments" / "sharding" / "fsdp2.yaml")
B = 4  # per-rank batch; the global batch is 2 * B on both sides of a comparison
STEPS = 6


# -- data: global batch k is shard k; rank r of w takes its r-th 1/w slice ---------------------------

class _Slices(IterableDataset):
    def __init__(self, shards: list[str], rank: int, world: int, start: int) -> None:
        self.shards, self.rank, self.world, self.start = shards, rank, world, start

    def __iter__(self):
        from data.pairs import _npy, collate_pairs

        k = self.start  # a resumed run continues with the batch after its last step
        while True:
            with tarfile.open(self.shards[k % len(self.shards)]) as tar:
                files: dict[str, dict] = {}
                for m in tar.getmembers():
                    key, ext = m.name.split(".", 1)
                    files.setdefault(key, {})[ext] = tar.extractfile(m).read()
            keys = sorted(files)
            n = len(keys) // self.world
            yield collate_pairs([{"key": key, "caption": files[key]["txt"].decode(), "x0": _npy(files[key]["x0.npy"]),
                                  "x1": _npy(files[key]["x1.npy"]), "seed": 0, "skipped": 0}
                                 for key in keys[self.rank * n:(self.rank + 1) * n]])
            k += 1


class SlicedCouplings(L.LightningDataModule):
    """Training batches whose union over ranks is, step for step, the one-process batch (test only)."""

    def __init__(self, train: str) -> None:
        super().__init__()
        self.train = train

    def train_dataloader(self) -> DataLoader:
        shards = sorted(str(p) for p in Path(self.train).glob("*.tar"))
        t = self.trainer
        return DataLoader(_Slices(shards, t.global_rank, t.world_size, t.global_step), batch_size=None)


def write_step_shards(folder: Path, n_steps: int, global_batch: int, latent: tuple = (4, 8, 8)) -> Path:
    """One coupling shard per step, with x0 stored, distinct captions and latents per sample."""
    from data.shards import npy_bytes, write_tar

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    words = ["red circle", "blue square", "green triangle", "yellow cross", "big disk", "small plus", "gray box", "dark sun"]
    for k in range(n_steps):
        members = []
        for i in range(global_batch):
            key = f"{k:03d}_{i:03d}"
            members += [(f"{key}.txt", f"a {words[(i + k) % len(words)]} number {i}".encode()),
                        (f"{key}.x0.npy", npy_bytes(torch.randn(latent, generator=g), "float32")),
                        (f"{key}.x1.npy", npy_bytes(torch.randn(latent, generator=g).clamp(-2, 2), "float32"))]
        write_tar(folder / f"{k:05d}.tar", members)
    return folder


def reflow_yaml(tmp_path: Path, tiny_sd_folder: Path, pairs: Path, name: str, max_steps: int = STEPS) -> str:
    """reflow.yaml on the tiny SD, deterministic apart from the data split: constant t, no caption dropout."""
    (tmp_path / name).mkdir(parents=True, exist_ok=True)
    src = tiny_yaml("reflow.yaml", tmp_path / name, {
        "init": str(tiny_sd_folder), "export_dir": str(tmp_path / name / "export"), "lr": 1e-3, "warmup_steps": 1,
        # t = sigmoid(0 + 0 * z) = 0.5 for every sample: the draws of t would differ between 1 and 2 ranks
        "time_distribution": "logit_normal", "time_kwargs": {"mean": 0.0, "std": 0.0}, "caption_dropout": 0.0,
        "grid_steps": [1]}, {}, {"max_steps": max_steps, "limit_val_batches": 0, "log_every_n_steps": 1,
                                 "val_check_interval": 1000, "enable_progress_bar": False})
    cfg = yaml.safe_load(Path(src).read_text())
    cfg["data"] = {"class_path": "tests.lightning_modules.test_distributed.SlicedCouplings", "init_args": {"train": str(pairs)}}
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if not c["class_path"].endswith("ImageGrid")]
    for c in cfg["trainer"]["callbacks"]:
        if c["class_path"].endswith("ModelCheckpoint"):
            c["init_args"].update(every_n_train_steps=3, save_top_k=-1)
    cfg["trainer"]["logger"]["init_args"]["name"] = name
    Path(src).write_text(yaml.safe_dump(cfg))
    return src




def run_2proc(args: list[str], timeout: float = 300) -> None:
    """``python -m lightning_modules.cli ARGS`` on 2 CPU processes (gloo) through Lightning's launcher."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "lightning_modules.cli", *args, "--trainer.accelerator", "cpu",
                           "--trainer.devices", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next((folder / "unet").glob("*.safetensors"))))


def test_sharded_unet_bf16_policy_optimizer_and_export(tiny_sd_folder):
    """In one gloo process: per-block FSDP2 with the bf16 policy (timestep kept fp32), activation checkpointing,
    only UNet parameters in the optimizer, frozen parts unsharded, and a whole UNet gathered for export."""
    from torch.distributed.tensor import DTensor

    from lightning_modules.reflow import ReflowTraining
    from instaflow.models.sharding import is_sharded

    kw = dict(init=str(tiny_sd_folder), parameterization="velocity_wrapper", caption_dropout=0.0,
              time_distribution="logit_normal", time_kwargs={"mean": 0.0, "std": 0.0})
    with reference_and_sharded(ReflowTraining, **kw) as (ref, ref_loss, model, batch):
        assert is_sharded(model.unet) and model.unet.is_gradient_checkpointing
        assert not any(isinstance(p, DTensor) for m in (model.vae, model.text_encoder) for p in m.parameters())
        opt = model.configure_optimizers()["optimizer"]
        assert {id(p) for grp in opt.param_groups for p in grp["params"]} == {id(p) for p in model.unet.parameters()}

        seen = {}

        def record(name):
            return lambda module, args: seen.update({name: args[0].dtype}) and None

        model.unet.time_proj.register_forward_pre_hook(record("timestep"))
        model.unet.conv_in.register_forward_pre_hook(record("sample"))
        loss = model.loss(batch, torch.Generator(), 0.0)
        loss.backward()
        assert seen == {"timestep": torch.float32, "sample": torch.bfloat16} and loss.dtype == torch.float32
        assert loss.item() == pytest.approx(ref_loss.item(), rel=0.05)  # bf16 forward of the same weights
        grads = [p.grad for p in model.unet.parameters()]
        assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g.full_tensor()).all() for g in grads)

        whole = model.export_unet()
        assert not is_sharded(whole)
        for k, v in ref.unet.state_dict().items():
            assert torch.equal(whole.state_dict()[k], v), k


@pytest.fixture(scope="module")
def runs(tiny_sd_folder, tmp_path_factory):
    """The one-process reference and the 2-process FSDP2 run (checkpoints at steps 3 and 6) of the same data."""
    root = tmp_path_factory.mktemp("distributed")
    pairs = write_step_shards(root / "pairs", STEPS, 2 * B)
    cli(["fit", "-c", BASE, "-c", reflow_yaml(root, tiny_sd_folder, pairs, "one")])
    run_2proc(["fit", "-c", BASE, "-c", reflow_yaml(root, tiny_sd_folder, pairs, "fsdp"), "-c", FSDP2,
               "--trainer.strategy.init_args.data_parallel_size", "2", "--model.init_args.fsdp_mixed_precision", "null"])
    return root, pairs


def losses(root: Path, name: str) -> tuple[list[int], list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(next((root / name / "runs" / name).glob("version_*"))))
    ea.Reload()
    events = ea.Scalars("train/loss")
    return [e.step for e in events], [e.value for e in events]


def assert_same_model(root: Path, name: str, ref: str = "one") -> None:
    w, ref_w = unet_weights(root / name / "export"), unet_weights(root / ref / "export")
    assert w.keys() == ref_w.keys()
    for k in ref_w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name} {k}: {m}")


# fp32 on both sides and the same samples in every global batch: the only difference is the order of
# floating-point sums in the gradient all-reduce (~1e-7 relative), so the tolerance is 1e-4.

def test_fsdp2_on_two_processes_matches_one_process(runs):
    """1 process x batch 2B == FSDP2 on 2 processes x batch B: same loss curve, same exported (EMA) UNet."""
    root, _ = runs
    steps, ref = losses(root, "one")
    assert steps == list(range(STEPS)) and ref[-1] < ref[0]
    got_steps, got = losses(root, "fsdp")
    assert got_steps == steps
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    assert_same_model(root, "fsdp")  # gathered from the shards by Export, inside the EMA swap


def test_sharded_checkpoint_resumes_step_count_loss_and_ema(runs, tiny_sd_folder):
    """A distributed checkpoint (one file per rank) resumed at step 3 continues to the straight run's steps 4-6."""
    root, pairs = runs
    ckpt = root / "fsdp" / "ckpt" / "reflow.yaml" / "epoch=0-step=3.ckpt"
    assert ckpt.is_dir() and sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    meta = torch.load(ckpt / "meta.pt", weights_only=False)
    shadow = next(v for k, v in meta["callbacks"].items() if k.startswith("EMA"))["shadow"]
    ref_unet = unet_weights(tiny_sd_folder)
    assert sum(s.numel() for s in shadow) == sum(v.numel() for v in ref_unet.values())  # whole tensors, not shards

    run_2proc(["fit", "-c", BASE, "-c", reflow_yaml(root, tiny_sd_folder, pairs, "resumed"), "-c", FSDP2,
               "--trainer.strategy.init_args.data_parallel_size", "2", "--model.init_args.fsdp_mixed_precision", "null",
               "--ckpt_path", str(ckpt)])
    steps, resumed = losses(root, "resumed")
    straight_steps, straight = losses(root, "fsdp")
    assert steps == [3, 4, 5]
    np.testing.assert_allclose(resumed, straight[3:], rtol=1e-5)
    assert_same_model(root, "resumed", ref="fsdp")  # optimizer, scheduler and EMA state all came back


def test_lightning_launcher_ddp_matches_one_process(runs, tiny_sd_folder):
    """DDP on 2 processes x batch B == 1 process x batch 2B (loss curve and exported EMA UNet)."""
    root, pairs = runs
    run_2proc(["fit", "-c", BASE, "-c", reflow_yaml(root, tiny_sd_folder, pairs, "ddp"), "--trainer.strategy", "ddp"])
    assert losses(root, "ddp")[0] == losses(root, "one")[0]
    np.testing.assert_allclose(losses(root, "ddp")[1], losses(root, "one")[1], rtol=1e-4)
    assert_same_model(root, "ddp")


def test_two_rank_coupling_generation_writes_every_key_once_and_resumes(tiny_world, tiny_sd_folder, tmp_path):
    """predict on 2 ranks: each rank writes its own input shards (manifest per rank); no key twice, none missing,
    also after a kill midway (one rank's shard half-written, the other's unmarked) and a rerun."""
    from data.laion import LaionStream

    out = tmp_path / "pairs"
    cfg = tiny_yaml("pairs_teacher.yaml", tmp_path, {"model": str(tiny_sd_folder), "steps": 3}, {
        "predict": tiny_world.train, "resolution": 16, "eval_batch_size": 8, "num_workers": 0}, writer_dir=out)
    args = ["predict", "-c", BASE, "-c", cfg, "--trainer.strategy", "ddp"]
    expected = sorted(s["key"] for s in LaionStream(tiny_world.train, captions_only=True))
    assert len(expected) == 64

    run_2proc(args)
    full = read_pairs(out)
    assert sorted(full) == expected
    stats = {p.name: json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))}
    assert sum(s["count"] for s in stats.values()) == 64 and sorted(k for s in stats.values() for k in s["keys"]) == expected
    assert {n: s["rank"] for n, s in stats.items()} == {  # the rank split of data.laion: shards[rank::world]
        "00000_stats.json": 0, "00001_stats.json": 1, "00002_stats.json": 0, "00003_stats.json": 1}
    manifests = [json.loads((out / f"manifest_rank{r}.json").read_text()) for r in (0, 1)]
    assert [sorted(m["shards"]) for m in manifests] == [["00000.tar", "00002.tar"], ["00001.tar", "00003.tar"]]
    assert sorted(k for m in manifests for keys in m["shards"].values() for k in keys) == expected

    # the kill: rank 1 died inside shard 3 (half-written .tmp), rank 0 after writing shard 2 but before marking it
    keep = {n: (out / n).stat().st_mtime_ns for n in ("00000.tar", "00001.tar")}
    (out / "00003.tar").rename(out / dead_writers_temporary("00003.tar"))
    (out / "00003_stats.json").unlink()
    (out / "00002_stats.json").unlink()
    run_2proc(args)
    again = read_pairs(out)
    assert sorted(again) == expected and not list(out.glob(".*.tmp-*"))
    assert sum(len(tarfile.open(p).getnames()) for p in out.glob("*.tar")) == 4 * 64  # txt, json, x1, states once each
    assert {n: (out / n).stat().st_mtime_ns for n in keep} == keep  # complete shards were skipped
    manifests = [json.loads((out / f"manifest_rank{r}.json").read_text()) for r in (0, 1)]
    assert [sorted(m["shards"]) for m in manifests] == [["00002.tar"], ["00003.tar"]]
    assert [m["skipped_complete"] for m in manifests] == [2, 2]
    for key in expected:  # regenerated couplings are bit-identical (per-key seeds, rank-independent)
        assert again[key]["x1.npy"] == full[key]["x1.npy"]
