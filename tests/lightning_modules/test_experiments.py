"""Every experiment YAML parses and instantiates; wrong keys fail at parse time; the teacher trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, TINY_UNET, TINY_VAE
from instaflow.experiments import chain, config_args, expand, resolved

BASE = str(ROOT / "experiments" / "base" / "default.yaml")
EXPERIMENTS = sorted(p for p in (ROOT / "experiments").rglob("*.yaml") if "base" not in p.parts and "sweeps" not in p.parts)


def cli(args: list[str], run: bool = False):
    from lightning_modules.cli import main

    return main(args, run=run)


def config_chain(exp: Path) -> list[str]:
    """``-c`` arguments for an experiment: its whole chain, as ``make run`` applies it."""
    return config_args(exp)


@pytest.mark.parametrize("exp", [p for p in EXPERIMENTS if "fragments" not in p.parts], ids=lambda p: str(p.relative_to(ROOT)))
def test_experiment_parses_and_instantiates_what_its_chain_declares(exp: Path, tmp_path):
    """The CLI builds exactly what the experiment's chain says: the model class with its keys, the data
    module, and every callback of the merged list (fragments included) in order."""
    want = resolved(exp)
    logger = want["trainer"].get("logger", True)
    extra = ["--trainer.logger.init_args.save_dir", str(tmp_path)] if logger is not False else []
    c = cli([*config_chain(exp), *extra])
    assert f"{type(c.model).__module__}.{type(c.model).__name__}" == want["model"]["class_path"]
    assert f"{type(c.datamodule).__module__}.{type(c.datamodule).__name__}" == want["data"]["class_path"]
    for key, value in (want["model"].get("init_args") or {}).items():
        assert _plain(c.model.hparams[key]) == _plain(value), key
    declared = [cb["class_path"].rsplit(".", 1)[1] for cb in want["trainer"].get("callbacks") or []]
    built = [type(cb).__name__ for cb in c.trainer.callbacks]
    assert [n for n in built if n in declared] == [n for n in declared if n != "ModelCheckpoint"] + \
        ["ModelCheckpoint"] * declared.count("ModelCheckpoint")  # Lightning runs checkpoints last
    assert c.trainer.max_steps == want["trainer"]["max_steps"]


def _plain(v):
    """YAML and hparams values on one footing: tuples as lists, numeric strings (PyYAML reads 1e-4 as a
    string) as floats, mappings as plain dicts."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict) or hasattr(v, "items"):
        return {k: _plain(x) for k, x in dict(v).items()}
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


def test_experiment_headers_resolve_by_name():
    """``# extends:`` names resolve to the chain the CLI applies; ``# command:`` gives the subcommand."""
    names = [p.relative_to(ROOT / "experiments") for p in chain("embedded/distill_direct")]
    assert [str(n) for n in names] == ["base/default.yaml", "fragments/embedded_flow_callbacks.yaml",
                                       "embedded/distill.yaml", "embedded/distill_direct.yaml"]
    assert expand(["--experiment", "embedded/pairs_teacher", "--trainer.max_steps", "3"])[:1] == ["predict"]
    assert expand(["fit", "--experiment", "embedded/reflow"])[0] == "fit"
    assert expand(["--experiment", "embedded/reflow", "--x", "1"])[-2:] == ["--x", "1"]
    with pytest.raises(FileNotFoundError, match="embedded/reflow"):
        chain("embedded/reflwo")


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


def tiny_experiment(name: str, tmp_path: Path, tiny_world, model_args: dict, export_to: Path,
                    source: Path | None = None) -> str:
    """A copy of experiments/embedded/<name>.yaml (or ``source``) pointed at the tiny world, tiny models and tmp folders."""
    cfg = resolved(f"embedded/{name}") if source is None else yaml.safe_load(source.read_text())
    source = source or ROOT / "experiments" / "embedded" / f"{name}.yaml"
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    # no evaluator in this test: drop the FID/alignment curves
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if not c["class_path"].endswith(".Quality")]
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("Export"):
            cb.setdefault("init_args", {})["dirpath"] = str(export_to)
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["dirpath"] = str(tmp_path / "ckpt" / name)
        if cb["class_path"].endswith("ImageGrid") and cb["init_args"]["prompts"]:
            cb["init_args"]["prompts"] = cb["init_args"]["prompts"][:2]
    cfg["trainer"].update(max_steps=60, val_check_interval=30, limit_val_batches=1, log_every_n_steps=5)
    cfg["model"]["init_args"].update(model_args)
    cfg["data"]["init_args"].update(train=tiny_world.train, val=tiny_world.val, resolution=16, batch_size=8,
                                    num_workers=0, shuffle_buffer=16)
    path = tmp_path / f"tiny_{source.name}"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_embedded_teacher_recipe_on_tiny_models(tiny_world, tiny_sd_folder, tmp_path):
    """vae.yaml then teacher.yaml, with tiny models: losses fall, the pipeline folder exports and loads."""
    from instaflow.models.sampler import TextToImage

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


def test_embedded_teacher_growth_stage_on_tiny_models(tiny_world, tiny_sd_folder, tmp_path):
    """teacher_binding.yaml on tiny models: starts from a stage-1 folder, grows the UNet (two transformer
    layers, longer captions), decays the learning rate to zero, exports a loadable pipeline."""
    from instaflow.models import loading
    from instaflow.models import saving
    from instaflow.models import unet
    from instaflow.models.sampler import TextToImage

    stage1 = tmp_path / "stage1"
    saving.save_pipeline(str(stage1), unet.build_unet(TINY_UNET), loading.load_vae(str(tiny_sd_folder)),
                         dict(loading.load_scheduler_config(str(tiny_sd_folder))))
    grown_cfg = {**TINY_UNET, "transformer_layers_per_block": 2}
    teacher = yaml.safe_load((ROOT / "experiments" / "embedded" / "teacher.yaml").read_text())
    stage2 = yaml.safe_load((ROOT / "experiments" / "embedded" / "teacher_binding.yaml").read_text())
    assert stage2["model"]["init_args"]["init_from"] == teacher["model"]["init_args"]["export_dir"]
    assert stage2["model"]["init_args"]["unet"]["transformer_layers_per_block"] == 2
    assert stage2["model"]["init_args"]["max_length"] > teacher["model"]["init_args"]["max_length"]
    # stage 2 is teacher.yaml overridden by teacher_binding.yaml (its unet is restated whole, and set below)
    merged = tmp_path / "teacher_binding.yaml"
    merged.write_text(yaml.safe_dump(resolved("embedded/teacher_binding")))
    out = tmp_path / "grown"
    args = {"vae": str(tiny_sd_folder), "init_from": str(stage1), "unet": grown_cfg, "text_encoder": str(tiny_sd_folder),
            "max_length": 20, "lr": 1e-3, "warmup_steps": 5, "lr_decay_steps": 60, "sample_steps": 4,
            "export_dir": str(out)}
    cli(["fit", "-c", BASE, "-c", tiny_experiment("teacher", tmp_path, tiny_world, args, out, source=merged)], run=True)
    logdir = next((tmp_path / "runs" / "teacher_binding").glob("version_*"))
    loss = _scalars(logdir, "train/loss")
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3
    lrs = _scalars(logdir, "lr-AdamW")
    assert max(lrs) == pytest.approx(1e-3, rel=0.05) and lrs[-1] < 0.05 * max(lrs)  # cosine to zero at step 60
    model = TextToImage.from_pretrained(str(out))
    assert model.unet.config.transformer_layers_per_block == 2 and model.text_encoder.max_length == 20
    assert model.sample(["a red circle"], steps=4, guidance=3.0).shape == (1, 3, 16, 16)


def test_decoder_refinement_keeps_the_latent_space(tiny_world, tiny_sd_folder, tmp_path):
    """vae_decoder_refine.yaml on tiny models: trains the decoder alone from a folder's VAE, decays the
    learning rate to zero, and exports a VAE whose encoder and scaling factor are bit-identical, so a
    UNet trained on the old latents stays valid."""
    from instaflow.models import loading
    from instaflow.evaluation.protocol import real_test_set

    decoder = yaml.safe_load((ROOT / "experiments" / "embedded" / "vae_decoder.yaml").read_text())
    refine = yaml.safe_load((ROOT / "experiments" / "embedded" / "vae_decoder_refine.yaml").read_text())
    assert refine["model"]["init_args"]["init_from"] == decoder["model"]["init_args"]["export_dir"]
    merged = tmp_path / "vae_decoder_refine.yaml"
    merged.write_text(yaml.safe_dump(resolved("embedded/vae_decoder_refine")))
    out = tmp_path / "refined"
    args = {"init_from": str(tiny_sd_folder), "lr": 1e-3, "warmup_steps": 5, "lr_decay_steps": 60}
    cli(["fit", "-c", BASE, "-c", tiny_experiment("vae_decoder", tmp_path, tiny_world, args, out, source=merged)],
        run=True)
    logdir = next((tmp_path / "runs" / "vae_decoder_refine").glob("version_*"))
    lrs = _scalars(logdir, "lr-AdamW")
    assert lrs[-1] < 0.05 * max(lrs)

    before, after = loading.load_vae(str(tiny_sd_folder)), loading.load_vae(str(out))
    # the refined decoder reconstructs the world's images better from the same latents
    images, _, _ = real_test_set(tiny_world.train, 32, resolution=16)
    x = images.float() / 127.5 - 1  # (32, 3, 16, 16)
    with torch.no_grad():
        z = before.encode(x).latent_dist.mode()
        err = [float((vae.decode(z).sample - x).abs().mean()) for vae in (before, after)]
    assert err[1] < 0.97 * err[0], err
    assert after.config.scaling_factor == before.config.scaling_factor
    old, new = before.state_dict(), after.state_dict()
    frozen = [k for k in old if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(old[k], new[k]) for k in frozen)
    assert any(not torch.equal(old[k], new[k]) for k in old if k.startswith("decoder."))


def test_teacher_recipe_parts_hand_over_through_their_exports():
    """make train-teacher's parts chain: each starts from the folder the part before it exports, and
    the last UNet cycle and the decoder refinement both write the committed teacher's folder."""
    def args(name: str) -> dict:
        return yaml.safe_load((ROOT / "experiments" / "embedded" / f"{name}.yaml").read_text())["model"]["init_args"]

    decoder, stage1 = args("vae_decoder"), args("teacher")
    assert stage1["vae"] == decoder["export_dir"] == args("vae_decoder_refine")["init_from"]
    previous = stage1["export_dir"]
    for part in ("teacher_binding", "teacher_binding_more", "teacher_binding_three"):
        assert args(part)["init_from"] == previous, part
        previous = args(part)["export_dir"]
    assert previous == args("vae_decoder_refine")["export_dir"] == "assets/embedded-sd"


def test_make_run_runs_an_experiment_by_name(tmp_path):
    """``make run EXP=...`` is one CLI call naming the experiment; the CLI expands it to the same chain."""
    import subprocess

    from tests.tools.test_make_values import make_calls

    def make(*args):
        return subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/.installed", "run", *args],
                              cwd=ROOT, capture_output=True, text=True)

    call, = make_calls(tmp_path, "run", "EXP=embedded/distill_direct", "ARGS=--trainer.max_steps 3")
    assert call == ["-m", "lightning_modules.cli", "--experiment", "embedded/distill_direct", "--trainer.max_steps", "3"]
    assert expand(["--experiment", "embedded/distill_direct", "--trainer.max_steps", "3"]) == \
        ["fit", *config_args("embedded/distill_direct"), "--trainer.max_steps", "3"]
    missing = make()
    assert missing.returncode != 0 and "make run EXP=" in missing.stderr
