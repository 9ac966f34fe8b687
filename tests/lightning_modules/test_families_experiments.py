"""experiments/sd3/ and experiments/flux/: every file parses and instantiates with a tiny model of its family
swapped in by command-line overrides, and runs its stage's step (a coupling batch, a training loss)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.lightning_modules.test_sd15 import cli, config_chain, stated_global_batch, write_couplings

SD3 = [p for fam in ("sd3", "flux", "sdxl") for p in sorted((ROOT / "experiments" / fam).glob("*.yaml"))]


@pytest.fixture(scope="module")
def sd3_couplings(tmp_path_factory) -> Path:
    return write_couplings(tmp_path_factory.mktemp("sd3_pairs") / "pairs", shape=(4, 8, 8))


@pytest.mark.parametrize("exp", SD3, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_family_experiment_instantiates_with_a_tiny_model(exp, tmp_path, tiny_sd3_folder, tiny_flux_folder,
                                                         tiny_sdxl_folder, tiny_world, sd3_couplings):
    family = exp.parent.name
    folder = {"sd3": tiny_sd3_folder, "flux": tiny_flux_folder, "sdxl": tiny_sdxl_folder}[family]
    args = ["--trainer.default_root_dir", str(tmp_path / "root"), "--trainer.logger.init_args.save_dir",
            str(tmp_path / "runs")]
    if family == "flux":
        args += ["--model.init_args.resolution", "16"]
    if exp.stem.startswith("pairs"):
        args += ["--model.init_args.model", str(folder), "--data.init_args.predict", tiny_world.train,
                 "--data.init_args.num_workers", "0", "--data.init_args.filters.missing_field", "keep"]
    else:
        args += ["--model.init_args.init", str(folder), "--data.init_args.train", str(sd3_couplings),
                 "--data.init_args.val", str(sd3_couplings), "--data.init_args.num_workers", "0"]
    c = cli([*config_chain(exp), *args])
    model, dm, trainer = c.model, c.datamodule, c.trainer
    model.configure_model()
    h = model.hparams
    if exp.stem.startswith("pairs"):
        assert model.pipe.name == family
        if family == "sdxl":
            assert (h.kind, h.solver) == (("ddpm", "dpm_solver++") if exp.stem == "pairs_teacher" else
                                          ("ddpm_velocity", "euler"))
        else:
            assert (h.kind, h.solver) == ("flow_matching", "euler")
        assert not h.store_text_states
        batch = next(iter(dm.predict_dataloader()))
        out = model.predict_step({k: (v[:2] if isinstance(v, list) else v) for k, v in batch.items()}, 0)
        assert out["x1"].shape == (2, 4, 8, 8) and torch.isfinite(out["x1"]).all()
        assert model.metadata()["family"] == family
        return
    total, factors = stated_global_batch(exp)
    assert total == trainer.num_nodes * trainer.num_devices * dm.batch_size * trainer.accumulate_grad_batches
    if family == "sdxl":
        assert h.parameterization == "velocity_wrapper" and model.kind == "ddpm_velocity" and model.family.name == family
    else:
        assert h.parameterization == "flow" and model.kind == "flow_matching" and model.family.name == family
    batch = next(iter(dm.train_dataloader()))
    loss = model.loss(batch, torch.Generator().manual_seed(0), 0.1)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert {type(cb).__name__ for cb in trainer.callbacks} >= {"Quality", "EMA", "Export", "ImageGrid"}


def test_sd3_misspelled_key_fails_by_name(capsys):
    with pytest.raises(SystemExit):
        cli([*config_chain(ROOT / "experiments" / "sd3" / "reflow.yaml"), "--model.init_args.parameterisation", "flow"])
    assert "parameterisation" in capsys.readouterr().err
