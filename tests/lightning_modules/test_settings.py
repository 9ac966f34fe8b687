"""Settings are checked when a module is built (issue #24): a bad value fails at once, naming its key.

Before, NaN or <= 1 guidance silently turned guidance off, a negative or infinite learning rate was
accepted until it diverged the run, and bad step counts, warm-ups, dropouts or EMA decays surfaced (if
at all) hours in. Every constructor below is cheap (networks load in ``configure_model``).
"""

from __future__ import annotations

import math

import pytest

from tests.conftest import TINY_UNET, TINY_VAE

NAN, INF = math.nan, math.inf


def _reflow(**kw):
    from lightning_modules.reflow import ReflowTraining

    return ReflowTraining("unused", **kw)


def _distill(**kw):
    from lightning_modules.distill import DistillTraining

    return DistillTraining("unused", **kw)


def _pseudo_huber(**kw):
    from instaflow.losses import PseudoHuber

    return PseudoHuber(**kw)


def _lpips(**kw):
    from instaflow.losses import LPIPSHuber

    return LPIPSHuber(**kw)


def _loss_optimizer(**kw):
    from instaflow.losses import NetworkOptimizer

    return NetworkOptimizer(**kw)


def _couplings(**kw):
    from lightning_modules.couplings import CouplingGeneration

    return CouplingGeneration("unused", **kw)


def _teacher(**kw):
    from lightning_modules.embedded.teacher import DiffusionTraining

    return DiffusionTraining("unused", TINY_UNET, **kw)


def _vae(**kw):
    from lightning_modules.embedded.autoencoder import AutoencoderTraining

    return AutoencoderTraining(TINY_VAE, **kw)


def _evaluator(**kw):
    from lightning_modules.embedded.evaluator import EvaluatorTraining

    return EvaluatorTraining(width=4, feature_dim=8, **kw)


def _ema(**kw):
    from callbacks.ema import EMA

    return EMA(**kw)


BAD = [  # (builder, bad setting, what the message starts with)
    *[(_reflow, {"lr": v}, "lr must be") for v in (NAN, INF, -1e-4, 0.0)],
    (_reflow, {"warmup_steps": -1}, "warmup_steps must be"),
    (_reflow, {"warmup_steps": 2.5}, "warmup_steps must be"),
    (_reflow, {"weight_decay": -0.1}, "weight_decay must be"),
    *[(_reflow, {"caption_dropout": v}, "caption_dropout must be") for v in (1.5, -0.1, NAN)],
    *[(_reflow, {"grid_guidance": v}, "grid_guidance must be") for v in (NAN, INF, -1.0)],
    (_reflow, {"guidance_input": NAN}, "guidance_input must be"),
    (_reflow, {"grid_steps": [1, 0]}, "grid_steps must be"),
    (_reflow, {"text_cache_mb": -1}, "text_cache_mb must be"),
    (_reflow, {"lora_alpha": 0.0}, "lora_alpha must be"),
    (_reflow, {"time_distribution": "logit_normal", "time_kwargs": {"sigma": 1.0}}, "time_kwargs"),
    (_reflow, {"time_distribution": "gamma"}, "unknown time distribution"),
    (_distill, {"lr": INF}, "lr must be"),
    (_distill, {"caption_dropout": 2.0}, "caption_dropout must be"),
    (_pseudo_huber, {"c": 0.0}, r"c \(pseudo-Huber\) must be"),
    (_lpips, {"c": NAN}, r"c \(LPIPS-Huber\) must be"),
    (_lpips, {"lpips_weight": -1.0}, "lpips_weight must be"),
    (_lpips, {"size": 8}, "size must be a pixel size"),
    (_lpips, {"features": "evaluator"}, "features must be one of"),
    (_loss_optimizer, {"lr": INF}, "loss optimizer lr must be"),
    (_loss_optimizer, {"weight_decay": -1.0}, "loss optimizer weight_decay must be"),
    (_loss_optimizer, {"betas": (0.9, 1.0)}, "loss optimizer betas must be"),
    *[(_distill, {key: value}, f"{key} was removed.*write loss:") for key, value in
      (("loss_type", "l2"), ("huber_c", 0.03), ("perceptual_features", "lpips_vgg"), ("perceptual_size", 224))],
    (_distill, {"grid_steps": [-1]}, "grid_steps must be"),
    *[(_couplings, {"guidance": v}, "guidance must be") for v in (NAN, INF, -3.0)],
    *[(_couplings, {"steps": v}, "steps must be") for v in (0, -5, 2.5)],
    (_teacher, {"lr": -2e-4}, "lr must be"),
    (_teacher, {"warmup_steps": -10}, "warmup_steps must be"),
    (_teacher, {"caption_dropout": 1.1}, "caption_dropout must be"),
    (_teacher, {"sample_steps": 0}, "sample_steps must be"),
    (_teacher, {"sample_guidance": NAN}, "sample_guidance must be"),
    (_teacher, {"lr_decay_steps": 0}, "lr_decay_steps must be"),
    (_teacher, {"text_cache_mb": NAN}, "text_cache_mb must be"),
    (_teacher, {"nonfinite": "warn"}, "nonfinite must be"),
    (_vae, {"lr": NAN}, "lr must be"),
    (_vae, {"kl_weight": -1e-6}, "kl_weight must be"),
    (_evaluator, {"warmup_steps": -1}, "warmup_steps must be"),
    (_evaluator, {"lr": 0}, "lr must be"),
    *[(_ema, {"decay": v}, "EMA decay must be") for v in (1.0, 1.5, -0.1, NAN)],
]


@pytest.mark.parametrize("build,setting,message", BAD, ids=[f"{b.__name__[1:]}-{s}" for b, s, _ in BAD])
def test_a_bad_setting_fails_when_built_naming_its_key(build, setting, message):
    with pytest.raises(ValueError, match=message):
        build(**setting)


def test_good_settings_still_build():
    _reflow(lr=1e-4, warmup_steps=0, caption_dropout=1.0, grid_guidance=0.5, grid_steps=[1, 25], text_cache_mb=0)
    _couplings(guidance=0.0, steps=1)
    _teacher(sample_guidance=1.0, lr_decay_steps=None)
    _ema(decay=0.0)


@pytest.mark.parametrize("key,value,message", [("model.init_args.lr", "-1e-4", "lr must be"),
                                               ("model.init_args.grid_guidance", ".nan", "grid_guidance must be")])
def test_a_bad_setting_fails_at_parse_time_through_the_cli(key, value, message, tmp_path):
    """The same through LightningCLI (``--key value`` on an experiment): the run never starts."""
    from lightning_modules.cli import main

    with pytest.raises(ValueError, match=message):
        main(["--experiment", "embedded/reflow", f"--{key}={value}",
              f"--trainer.default_root_dir={tmp_path}"], run=False)


def test_a_yaml_still_using_loss_type_fails_naming_what_to_write_instead(tmp_path, capsys):
    """Issue 25: the loss is an object (``loss: {class_path: ...}``); an old config is refused before anything runs."""
    import yaml

    from lightning_modules.cli import main

    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"model": {"init_args": {"loss_type": "pseudo_huber"}}}))
    with pytest.raises(ValueError, match=r"loss_type was removed.*instead of loss_type: 'pseudo_huber' write loss: "
                                         r"\{class_path: instaflow.losses.L2\}.*instaflow.losses.PseudoHuber"):
        main(["--experiment", "embedded/distill", "-c", str(old), f"--trainer.default_root_dir={tmp_path}"], run=False)
    new = tmp_path / "new.yaml"  # the new spelling parses and builds the object
    new.write_text(yaml.safe_dump({"model": {"init_args": {"loss": {"class_path": "instaflow.losses.PseudoHuber",
                                                                     "init_args": {"c": 0.05}}}}}))
    cli = main(["--experiment", "embedded/distill", "-c", str(new), f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert type(cli.model.criterion).__name__ == "PseudoHuber" and cli.model.criterion.c == 0.05
    assert cli.model.hparams.loss == {"class_path": "instaflow.losses.PseudoHuber", "init_args": {"c": 0.05}}
    wrong = tmp_path / "wrong.yaml"  # a wrong key of the loss fails at parse time
    wrong.write_text(yaml.safe_dump({"model": {"init_args": {"loss": {"class_path": "instaflow.losses.PseudoHuber",
                                                                       "init_args": {"huber_c": 0.05}}}}}))
    with pytest.raises(SystemExit):
        main(["--experiment", "embedded/distill", "-c", str(wrong), f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert "Option 'huber_c' is not accepted" in capsys.readouterr().err


def test_a_bad_ema_decay_fails_at_parse_time_through_the_cli(tmp_path):
    import yaml

    from lightning_modules.cli import main

    cfg = tmp_path / "ema.yaml"
    cfg.write_text(yaml.safe_dump({"trainer": {"callbacks": [{"class_path": "callbacks.ema.EMA",
                                                              "init_args": {"decay": 1.0}}]}}))
    with pytest.raises(ValueError, match="EMA decay must be"):
        main(["--experiment", "embedded/reflow", "-c", str(cfg)], run=False)
