"""Every experiment YAML parses and instantiates; wrong keys fail at parse time; the teacher trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, TINY_UNET, TINY_VAE

BASE = str(ROOT / "experiments" / "base" / "default.yaml")
EXPERIMENTS = sorted(p for p in (ROOT / "experiments").rglob("*.yaml") if "base" not in p.parts and "sweeps" not in p.parts)


def cli(args: list[str], run: bool = False):
    from lightning_modules.cli import main

    return main(args, run=run)


def config_chain(exp: Path) -> list[str]:
    """``-c`` arguments for an experiment: the base, the files it extends (first-line comment), itself."""
    first = exp.read_text().splitlines()[0]
    parents = config_chain(ROOT / first.split(":", 1)[1].strip())[2:] if first.startswith("# extends:") else []
    return ["-c", BASE, *parents, "-c", str(exp)]


@pytest.mark.parametrize("exp", EXPERIMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_experiment_parses_and_instantiates(exp: Path, tmp_path):
    logger = yaml.safe_load(exp.read_text()).get("trainer", {}).get("logger", True)
    extra = ["--trainer.logger.init_args.save_dir", str(tmp_path)] if logger is not False else []
    c = cli([*config_chain(exp), *extra])
    assert c.model is not None and c.datamodule is not None
    assert c.trainer.max_steps > 0 or "pairs" in exp.name


def test_misspelled_key_fails_at_parse_time_naming_the_key(capsys, tmp_path):
    exp = ROOT / "experiments" / "embedded" / "teacher.yaml"
    with pytest.raises(SystemExit):
        cli(["-c", BASE, "-c", str(exp), "--model.init_args.learning_rat", "1e-3"])
    assert "learning_rat" in capsys.readouterr().err

    bad = tmp_path / "bad.yaml"
    cfg = yaml.safe_load(exp.read_text())
    cfg["model"]["init_args"]["caption_dropuot"] = 0.2
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit):
        cli(["-c", BASE, "-c", str(bad)])
    assert "caption_dropuot" in capsys.readouterr().err


def _scalars(logdir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir))
    ea.Reload()
    return [e.value for e in ea.Scalars(tag)]


def tiny_experiment(name: str, tmp_path: Path, tiny_world, model_args: dict, export_to: Path) -> str:
    """A copy of experiments/embedded/<name>.yaml pointed at the tiny world, tiny models and tmp folders."""
    cfg = yaml.safe_load((ROOT / "experiments" / "embedded" / f"{name}.yaml").read_text())
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("Export"):
            cb["init_args"]["dirpath"] = str(export_to)
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["dirpath"] = str(tmp_path / "ckpt" / name)
        if cb["class_path"].endswith("ImageGrid") and cb["init_args"]["prompts"]:
            cb["init_args"]["prompts"] = cb["init_args"]["prompts"][:2]
    cfg["trainer"].update(max_steps=60, val_check_interval=30, limit_val_batches=1, log_every_n_steps=5)
    cfg["model"]["init_args"].update(model_args)
    cfg["data"]["init_args"].update(train=tiny_world.train, val=tiny_world.val, resolution=16, batch_size=8,
                                    num_workers=0, shuffle_buffer=16)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_embedded_teacher_recipe_on_tiny_models(tiny_world, tiny_sd_folder, tmp_path):
    """vae.yaml then teacher.yaml, with tiny models: losses fall, the pipeline folder exports and loads."""
    from lightning_modules.pipeline import TextToImage

    build = tmp_path / "teacher"
    cli(["fit", "-c", BASE, "-c", tiny_experiment("vae", tmp_path, tiny_world, {"vae": TINY_VAE}, build)], run=True)
    vae_cfg = json.loads((build / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] > 0 and vae_cfg["scaling_factor"] != 0.18215
    vae_loss = _scalars(next((tmp_path / "runs" / "vae").glob("version_*")), "train/loss")
    assert vae_loss[-1] < vae_loss[0]

    teacher_args = {"vae": str(build), "unet": TINY_UNET, "text_encoder": str(tiny_sd_folder),
                    "max_length": 16, "lr": 1e-3, "warmup_steps": 5, "sample_steps": 4}
    cli(["fit", "-c", BASE, "-c", tiny_experiment("teacher", tmp_path, tiny_world, teacher_args, build)], run=True)
    logdir = next((tmp_path / "runs" / "teacher").glob("version_*"))
    loss = _scalars(logdir, "train/loss")
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3
    assert list((logdir / "grids").glob("teacher_dpm4_*.png")), "image grid not written"
    # the export is a pipeline folder that the generic loader reads like SD
    for sub in ("unet", "vae", "scheduler"):
        assert (build / sub).is_dir()
    assert json.loads((build / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    model = TextToImage.from_pretrained(str(build))
    images = model.sample(["a red circle in the center on a white background"] * 2, steps=4, guidance=3.0, seed=0)
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(images, model.sample(["a red circle in the center on a white background"] * 2, steps=4,
                                            guidance=3.0, seed=0))  # same seeds, same images
