"""The paper's SD 1.5 recipe (experiments/sd15/*.yaml): every file parses, states its global batch
honestly, and instantiates with the tiny SD and tiny shards swapped in by command-line overrides."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT

BASE = str(ROOT / "experiments" / "base" / "default.yaml")
SD15 = ROOT / "experiments" / "sd15"
CONFIGS = sorted(SD15.glob("*.yaml"))

# what docs/recipe.md (the model cards) fixes for each stage: global batch and iterations
RECIPE = {
    "reflow_part1": (64, 70_000), "reflow_part2": (1024, 25_000),
    "distill_part1": (1024, 21_500), "distill_part2": (1024, 18_000),
}


def cli(args: list[str]):
    from lightning_modules.cli import main

    return main(args, run=False)


def config_chain(exp: Path) -> list[str]:
    """``-c`` arguments: the experiment's whole chain (base, what it extends, itself), as ``make run`` applies it."""
    from instaflow.experiments import config_args

    return config_args(exp)


def write_couplings(folder: Path, n: int = 16, shape=(4, 8, 8)) -> Path:
    """A coupling shard as the writer makes it (x1 + caption + seed), for the tiny SD's 8x8 latents."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for i in range(n):
            key = f"{i:09d}"
            for ext, payload in (("txt", f"a photo of thing {i}".encode()),
                                 ("json", json.dumps({"key": key, "seed": i}).encode()),
                                 ("x1.npy", _npy(rng.standard_normal(shape).astype(np.float16)))):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return folder


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def tiny_overrides(exp: Path, tmp_path: Path, tiny_sd: Path, tiny_world, couplings: Path) -> list[str]:
    """Dotted overrides that point an sd15 experiment at tiny models, tiny shards and tmp folders."""
    import yaml

    chain = [yaml.safe_load(Path(a).read_text()) for a in config_chain(exp)[1::2]]
    logger = [c["trainer"]["logger"] for c in chain if "logger" in c.get("trainer", {})][-1]
    args = ["--trainer.default_root_dir", str(tmp_path / "root")]
    if logger is not False:
        args += ["--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    if exp.stem.startswith("pairs"):
        # the shapes world has no LAION metadata: keep samples that lack the filtered fields
        args += ["--model.init_args.model", str(tiny_sd), "--data.init_args.predict", tiny_world.train,
                 "--data.init_args.num_workers", "0", "--data.init_args.filters.missing_field", "keep"]
    else:
        args += ["--model.init_args.init", str(tiny_sd), "--data.init_args.train", str(couplings),
                 "--data.init_args.val", str(couplings), "--data.init_args.num_workers", "0"]
    return args


def stated_global_batch(exp: Path) -> tuple[int, dict]:
    """The 'Global batch N = num_nodes a x devices b x batch_size c x accumulate_grad_batches d' comment."""
    m = re.search(r"Global batch (\d+) = num_nodes (\d+) x devices (\d+) x batch_size (\d+) x "
                  r"accumulate_grad_batches (\d+)", exp.read_text())
    assert m, f"{exp.name} does not state its global batch as nodes x devices x batch x accumulation"
    total, nodes, devices, batch, acc = map(int, m.groups())
    return total, {"num_nodes": nodes, "devices": devices, "batch_size": batch, "accumulate_grad_batches": acc}


@pytest.fixture(scope="module")
def couplings(tmp_path_factory) -> Path:
    return write_couplings(tmp_path_factory.mktemp("sd15_pairs") / "pairs")


class StubLPIPS(torch.nn.Module):
    """Stands in for LPIPS-VGG (its backbone weights cannot be downloaded here): per-sample MSE."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).pow(2).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1) like LPIPS


@pytest.mark.parametrize("exp", CONFIGS, ids=lambda p: p.stem)
def test_sd15_experiment_instantiates_with_the_tiny_sd(exp, tmp_path, tiny_sd_folder, tiny_world, couplings,
                                                       tiny_clip_folder, monkeypatch):
    from instaflow.models import perceptual

    requested = []
    monkeypatch.setattr(perceptual, "load_lpips", lambda net="vgg": requested.append(net) or StubLPIPS())
    c = cli([*config_chain(exp), *tiny_overrides(exp, tmp_path, tiny_sd_folder, tiny_world, couplings)])
    model, dm, trainer = c.model, c.datamodule, c.trainer
    h = model.hparams
    model.configure_model()
    callbacks = {type(cb).__name__: cb for cb in trainer.callbacks}

    if exp.stem.startswith("pairs"):
        assert h.bf16 is True and callbacks["CouplingWriter"].latent_dtype == "float16"
        if exp.stem == "pairs_teacher":
            assert (h.kind, h.solver, h.steps, h.guidance) == ("ddpm", "dpm_solver++", 25, 5.0)
            assert model.pipe.kind == "ddpm"
        else:
            assert (h.kind, h.solver, h.guidance) == ("flow", "euler", 1.5)
        assert dm.captions_only and dm.filters is not None and dm.filters.max_punsafe == 0.1
        batch = next(iter(dm.predict_dataloader()))
        assert 0 < len(batch["caption"]) <= 64 and "pixel_values" not in batch
        small = {k: (v[:2] if isinstance(v, list) else v) for k, v in batch.items()}
        out = model.predict_step(small, 0)
        assert out["x1"].shape == (2, 4, 8, 8) and torch.isfinite(out["x1"]).all()
        return

    # training stages: the recipe's numbers, and the stated global batch is the configured one
    total, factors = stated_global_batch(exp)
    want_batch, want_steps = RECIPE[exp.stem]
    assert total == want_batch == (trainer.num_nodes * trainer.num_devices * dm.batch_size
                                   * trainer.accumulate_grad_batches)
    assert factors == {"num_nodes": trainer.num_nodes, "devices": trainer.num_devices, "batch_size": dm.batch_size,
                       "accumulate_grad_batches": trainer.accumulate_grad_batches}
    assert trainer.max_steps == want_steps
    assert trainer.gradient_clip_val == 1.0 and trainer.precision == "bf16-mixed"
    assert callbacks["EMA"].decay == 0.9999 and "Export" in callbacks
    assert h.lr == 1e-6 and h.warmup_steps == 1000
    if exp.stem == "reflow_part1":
        assert h.parameterization == "raw"  # the paper's start: SD's raw weights fed 1000 (1 - t)
    else:
        assert h.parameterization == "flow"  # continues a rectified flow
    if exp.stem == "distill_part2":  # the loss object, and its class path and settings in the hyperparameters
        from instaflow.losses import LPIPS

        assert isinstance(model.criterion, LPIPS) and requested == ["vgg"]
        assert h.loss == {"class_path": "instaflow.losses.LPIPS",
                          "init_args": {"features": "lpips_vgg", "decoder": None, "size": 224}}
    elif exp.stem.startswith("distill"):
        assert h.loss == {"class_path": "instaflow.losses.L2"}
    # one batch of the configured size through the configured loss on the tiny model
    batch = next(iter(dm.train_dataloader()))
    assert batch["x0"].shape == batch["x1"].shape == (dm.batch_size, 4, 8, 8)
    loss = model.loss(batch, torch.Generator().manual_seed(0), 0.0)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    check_quality_callback(exp, trainer, model, callbacks["Quality"], tiny_world, tiny_clip_folder)


def check_quality_callback(exp: Path, trainer, model, quality, tiny_world, clip: Path) -> None:
    """FID / CLIP on 1k COCO val captions; without COCO on disk the fit stops at start naming the file; a
    best-2 checkpoint follows the monitored FID; the callback scores the tiny SD (tiny prompts and networks)."""
    from types import SimpleNamespace

    from instaflow.evaluation.coco import CocoFilesMissing
    from instaflow.evaluation.quality import ClipScore, CleanFidInception, CocoPrompts, ShardPrompts
    from tests.callbacks.test_quality import TinyFeatures

    assert isinstance(quality.prompts, CocoPrompts) and quality.prompts.n == 1000
    assert isinstance(quality.features, CleanFidInception)
    assert [type(s) for s in quality.scores] == [ClipScore] and quality.scores[0].model == "openai/clip-vit-large-patch14"
    with pytest.raises(CocoFilesMissing, match="captions_val2017.json"):
        quality.setup(trainer, model, "fit")
    monitor = "quality/fid_euler4_w1.5" if exp.stem.startswith("reflow") else "quality/fid_euler1_w1"
    best = [cb for cb in trainer.checkpoint_callbacks if cb.monitor]
    assert [(cb.monitor, cb.mode, cb.save_top_k) for cb in best] == [(monitor, "min", 2)]

    quality.prompts = ShardPrompts(tiny_world.val, n=4, resolution=16)
    quality.features, quality.scores = TinyFeatures(), [ClipScore(str(clip))]
    quality.features.prepare(torch.device("cpu"))
    quality.scores[0].prepare(torch.device("cpu"))
    quality._set = quality.prompts.load()
    stub = SimpleNamespace(global_rank=0, world_size=1, global_step=0, callback_metrics={}, log_dir=None, loggers=[],
                           default_root_dir=str(trainer.default_root_dir),
                           strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj, root_device=torch.device("cpu"),
                                                    is_global_zero=True))
    quality._score(stub, model)
    got = {k: v.item() for k, v in stub.callback_metrics.items()}
    tags = [f"euler{s.steps}_w{s.guidance:g}" for s in quality.settings]
    assert {f"quality/{m}_{t}" for m in ("fid", "clip_score") for t in tags} <= set(got) and monitor in got
    assert all(np.isfinite(v) for v in got.values())


def test_sd15_chain_points_each_stage_at_the_previous_output():
    import yaml

    cfg = {p.stem: yaml.safe_load(p.read_text()) for p in CONFIGS}
    arg = lambda name, key: cfg[name]["model"]["init_args"][key]  # noqa: E731
    writer = lambda name: cfg[name]["trainer"]["callbacks"][0]["init_args"]["output_dir"]  # noqa: E731
    assert cfg["reflow_part1"]["data"]["init_args"]["train"] == writer("pairs_teacher")
    assert arg("reflow_part2", "init") == arg("reflow_part1", "export_dir")
    assert arg("pairs_rf2", "model") == arg("reflow_part2", "export_dir") == arg("distill_part1", "init")
    assert cfg["distill_part1"]["data"]["init_args"]["train"] == writer("pairs_rf2")
    assert arg("distill_part2", "init") == arg("distill_part1", "export_dir")
    # the 2-RF's couplings use other prompts than the teacher's
    assert cfg["pairs_rf2"]["data"]["init_args"]["predict"] != cfg["pairs_teacher"]["data"]["init_args"]["predict"]


def test_sd15_misspelled_key_fails(tmp_path, capsys, tiny_sd_folder):
    import yaml

    exp = SD15 / "pairs_teacher.yaml"
    with pytest.raises(SystemExit):
        cli([*config_chain(exp), "--model.init_args.guidence", "5.0"])
    assert "guidence" in capsys.readouterr().err
    cfg = yaml.safe_load((SD15 / "reflow_part1.yaml").read_text())
    cfg["data"]["init_args"]["batch_sise"] = 8
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit):
        cli(["-c", BASE, "-c", str(bad)])
    assert "batch_sise" in capsys.readouterr().err
    cfg = yaml.safe_load(exp.read_text())
    cfg["data"]["init_args"]["filters"]["max_pwatermrk"] = 0.5
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit):
        cli(["-c", BASE, "-c", str(bad)])
    assert "max_pwatermrk" in capsys.readouterr().err
