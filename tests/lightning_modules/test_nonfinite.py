"""The non-finite guard (issue #24): a step whose gradient is NaN while its loss is finite is skipped and counted
(or stops the run), never applied; the weights, the EMA and every checkpoint stay finite; on 2 ranks every rank
decides alike.

Before the guard, only the loss was checked: a NaN gradient at step k made the weights NaN, the EMA and the
next checkpoint followed, and the run only stopped at step k + 1 (its loss then NaN), with the poisoned
checkpoint left for auto-resume to pick up.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from tests.lightning_modules.test_chain import BASE, cli, scalars
from tests.lightning_modules.test_distributed import reflow_yaml, run_2proc, write_step_shards

K, STEPS = 3, 6  # the NaN goes into step K's gradient


class InjectNaN(L.Callback):
    """Puts a NaN into one gradient element on rank ``rank`` at the listed steps (after the backward pass, so
    after DDP's all-reduce: only that rank's gradient is NaN; the loss stays finite). Records the weights after
    every batch and, in ``out``, what each rank saw: ``rank<r>.pt`` at the end of the fit, ``error_rank<r>.txt``
    (time, exception) when it raised; rank 0 waits for the other ranks' error files (so a launcher does not
    kill them before they could write theirs)."""

    def __init__(self, steps: list[int], out: str, rank: int = 0, world: int = 1) -> None:
        self.steps, self.out, self.rank, self.world = list(steps), Path(out), rank, world
        self.snapshots: list[torch.Tensor] = []

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step in self.steps and trainer.global_rank == self.rank:
            grad = _first_local_grad(pl_module.unet)
            grad.view(-1)[0] = float("nan")
            (self.out / f"inject_rank{self.rank}.txt").write_text(f"{time.time()}\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.snapshots.append(_flat_local(pl_module.unet))

    def on_fit_end(self, trainer, pl_module) -> None:
        torch.save({"snapshots": self.snapshots, "skipped": pl_module.nonfinite_steps_skipped,
                    "global_step": trainer.global_step}, self.out / f"rank{trainer.global_rank}.pt")

    def on_exception(self, trainer, pl_module, exception) -> None:
        r = trainer.global_rank
        (self.out / f"error_rank{r}.txt").write_text(f"{time.time()}\n{type(exception).__name__}: {exception}\n")
        deadline = time.time() + 30
        while r == 0 and time.time() < deadline and not all(
                (self.out / f"error_rank{q}.txt").exists() for q in range(self.world)):
            time.sleep(0.1)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _first_local_grad(net: torch.nn.Module) -> torch.Tensor:
    return next(_local(p.grad) for p in net.parameters() if p.grad is not None and _local(p.grad).numel() > 0)


def _flat_local(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([_local(p.detach()).flatten() for p in net.parameters()]).clone()


def nonfinite_yaml(root: Path, tiny_sd_folder: Path, pairs: Path, name: str, steps: list[int], rank: int = 0,
                   world: int = 1, **model) -> str:
    """The deterministic tiny reflow of test_distributed (checkpoints every 3 steps, EMA, export) with ``InjectNaN``."""
    src = reflow_yaml(root, tiny_sd_folder, pairs, name)
    cfg = yaml.safe_load(Path(src).read_text())
    cfg["model"]["init_args"].update(model)
    (root / name / "out").mkdir(parents=True, exist_ok=True)
    cfg["trainer"]["callbacks"].append({"class_path": f"{__name__}.InjectNaN", "init_args": {
        "steps": steps, "out": str(root / name / "out"), "rank": rank, "world": world}})
    Path(src).write_text(yaml.safe_dump(cfg))
    return src


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_step_shards(tmp_path_factory.mktemp("nonfinite") / "pairs", STEPS, 8)


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _all_finite(ckpt: dict) -> bool:
    ema = next(v for k, v in ckpt["callbacks"].items() if k.startswith("EMA"))["shadow"]
    return all(torch.isfinite(t).all() for t in [*ckpt["state_dict"].values(), *ema])


def test_a_nan_gradient_with_a_finite_loss_is_skipped_counted_and_never_applied(pairs, tiny_sd_folder, tmp_path,
                                                                                capsys):
    from safetensors.torch import load_file

    cli(["fit", "-c", BASE, "-c", nonfinite_yaml(tmp_path, tiny_sd_folder, pairs, "skip", [K])])
    out = tmp_path / "skip"
    rec = torch.load(out / "out" / "rank0.pt")
    snaps = rec["snapshots"]
    assert rec["skipped"] == 1 and rec["global_step"] == STEPS == len(snaps)  # the skipped step still counts
    assert all(torch.isfinite(s).all() for s in snaps)
    assert torch.equal(snaps[K], snaps[K - 1])  # step K not applied: weights as after step K - 1 ...
    assert not torch.equal(snaps[K + 1], snaps[K])  # ... until the next real step
    assert f"[nonfinite] skipped step {K}" in capsys.readouterr().out

    last = _ckpt(out / "ckpt" / "reflow.yaml" / "last.ckpt")
    assert last["nonfinite_steps_skipped"] == 1 and last["global_step"] == STEPS and _all_finite(last)
    assert last["lr_schedulers"][0]["last_epoch"] == STEPS  # the schedule advanced on the skipped step too
    ema = next(v for k, v in last["callbacks"].items() if k.startswith("EMA"))
    assert ema["num_updates"] == STEPS - 1  # the EMA skipped it as well
    export = load_file(str(next((out / "export" / "unet").glob("*.safetensors"))))
    assert all(torch.isfinite(v).all() for v in export.values())
    logged = scalars(next((out / "runs" / "skip").glob("version_*")), "train/nonfinite_steps_skipped")
    assert logged == [0.0] * K + [1.0] * (STEPS - K)


def test_nonfinite_stop_raises_naming_the_step_and_saves_nothing_poisoned(pairs, tiny_sd_folder, tmp_path):
    cfg = nonfinite_yaml(tmp_path, tiny_sd_folder, pairs, "stop", [K], nonfinite="stop")
    with pytest.raises(FloatingPointError, match=f"non-finite loss or gradient at step {K} \\(nonfinite: stop\\)"):
        cli(["fit", "-c", BASE, "-c", cfg])
    ckpts = list((tmp_path / "stop" / "ckpt" / "reflow.yaml").glob("*.ckpt"))
    assert ckpts and all(_all_finite(_ckpt(p)) for p in ckpts)


def test_consecutive_skips_past_the_limit_stop_the_run(pairs, tiny_sd_folder, tmp_path):
    cfg = nonfinite_yaml(tmp_path, tiny_sd_folder, pairs, "limit", [K, K + 1], nonfinite_limit=2)
    with pytest.raises(FloatingPointError, match=f"2 consecutive steps up to step {K + 1} .* \\(nonfinite_limit: 2\\)"):
        cli(["fit", "-c", BASE, "-c", cfg])


def test_two_ranks_skip_the_same_step_when_only_rank_1_has_a_nan_gradient(pairs, tiny_sd_folder, tmp_path):
    """DDP on 2 processes: rank 1's gradient alone is NaN at step K (after the all-reduce); both ranks skip it,
    stay identical and finish."""
    cfg = nonfinite_yaml(tmp_path, tiny_sd_folder, pairs, "ddp", [K], rank=1, world=2)
    run_2proc(["fit", "-c", BASE, "-c", cfg, "--trainer.strategy", "ddp"])
    recs = [torch.load(tmp_path / "ddp" / "out" / f"rank{r}.pt") for r in (0, 1)]
    assert [r["skipped"] for r in recs] == [1, 1] and [r["global_step"] for r in recs] == [STEPS, STEPS]
    for a, b in zip(recs[0]["snapshots"], recs[1]["snapshots"]):
        assert torch.equal(a, b)  # no rank stepped alone
    snaps = recs[0]["snapshots"]
    assert torch.equal(snaps[K], snaps[K - 1]) and all(torch.isfinite(s).all() for s in snaps)


@pytest.mark.slow  # ~100 s on 2 shared cores (FSDP2 start-up on two processes)
def test_fsdp2_ranks_skip_the_same_step_when_only_rank_1s_shard_is_nan(pairs, tiny_sd_folder, tmp_path):
    """FSDP2 on 2 processes: gradients are sharded DTensors, and only rank 1's shard of one gradient is NaN at
    step K. Both ranks skip it (their verdicts are all-gathered), their shards stay as after step K - 1, and the
    run finishes with finite shards."""
    from tests.lightning_modules.test_distributed import FSDP2

    cfg = nonfinite_yaml(tmp_path, tiny_sd_folder, pairs, "fsdp", [K], rank=1, world=2)
    run_2proc(["fit", "-c", BASE, "-c", cfg, "-c", FSDP2, "--trainer.strategy.init_args.data_parallel_size", "2",
               "--model.init_args.fsdp_mixed_precision", "null"])
    for r in (0, 1):
        rec = torch.load(tmp_path / "fsdp" / "out" / f"rank{r}.pt")
        snaps = rec["snapshots"]  # this rank's shards
        assert rec["skipped"] == 1 and rec["global_step"] == STEPS, r
        assert torch.equal(snaps[K], snaps[K - 1]) and not torch.equal(snaps[K + 1], snaps[K]), r
        assert all(torch.isfinite(s).all() for s in snaps), r


def test_two_ranks_both_raise_the_named_step_at_once_under_stop(pairs, tiny_sd_folder, tmp_path):
    """nonfinite: stop with rank 1's gradient alone NaN: every rank raises naming step K within seconds (before
    the guard, rank 1 alone would have stopped and rank 0 waited in the next all-reduce)."""
    cfg = nonfinite_yaml(tmp_path, tiny_sd_folder, pairs, "ddp_stop", [K], rank=1, world=2, nonfinite="stop")
    with pytest.raises(AssertionError):  # the command fails (run_2proc asserts a zero exit status)
        run_2proc(["fit", "-c", BASE, "-c", cfg, "--trainer.strategy", "ddp"], timeout=240)
    out = tmp_path / "ddp_stop" / "out"
    injected = float((out / "inject_rank1.txt").read_text().split()[0])
    for r in (0, 1):
        when, what = (out / f"error_rank{r}.txt").read_text().split("\n", 1)
        assert f"FloatingPointError: non-finite loss or gradient at step {K}" in what, (r, what)
        assert float(when) - injected < 60, r


def test_the_verdict_reads_only_the_local_shards_of_fsdp2_gradients():
    """Under FSDP2 a gradient is a DTensor sharded over ranks: ``all_finite`` reads this rank's shard without a
    collective (the guard then all-gathers one number per rank)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from instaflow.flow.losses import all_finite
    from tests.conftest import one_rank_device_mesh

    with one_rank_device_mesh() as mesh:
        dp = mesh["data_parallel"]
        good = distribute_tensor(torch.ones(4, 3), dp, [Shard(0)])
        bad = distribute_tensor(torch.ones(4, 3), dp, [Shard(0)])
        bad.to_local().view(-1)[5] = float("inf")
        assert bool(all_finite([good, None])) and not bool(all_finite([good, bad]))
    assert bool(all_finite([])) and not bool(all_finite([torch.tensor([1.0, float("nan")])]))


def test_the_guard_setting_is_checked_when_the_module_is_built():
    from lightning_modules.reflow import ReflowTraining

    with pytest.raises(ValueError, match="nonfinite must be one of"):
        ReflowTraining("unused", nonfinite="ignore")
    with pytest.raises(ValueError, match="nonfinite_limit must be"):
        ReflowTraining("unused", nonfinite_limit=0)


def test_the_ema_refuses_to_average_non_finite_weights_naming_the_step():
    from torch.utils.data import DataLoader, TensorDataset

    from callbacks.ema import EMA
    from tests.callbacks.test_ema import _Linear

    class Poison(L.Callback):  # the weights themselves become NaN at optimizer step 2 (not through a gradient)
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                with torch.no_grad():
                    pl_module.net.weight[0, 0] = float("nan")

    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    ema = EMA(decay=0.9, attr="net")
    trainer = L.Trainer(max_steps=5, callbacks=[Poison(), ema], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    with pytest.raises(FloatingPointError, match="EMA: the weights are not finite after step 2"):
        trainer.fit(_Linear(), DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4))
    assert ema.num_updates == 1 and all(torch.isfinite(s).all() for s in ema.shadow)
