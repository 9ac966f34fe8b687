"""SD 2.1-style v-prediction teachers: couplings through DPM-Solver++, the velocity_wrapper reflow start,
agreement of the converted velocity with diffusers' DDIM, and the data filters recorded with the couplings."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch

from tests.lightning_modules.test_chain import BASE, cli, read_pairs, tiny_yaml
from tests.flow.test_flows import _rel, _run_ddim, _run_flow, _TimeModulatedUNet


@pytest.fixture(scope="module")
def tiny_vpred_folder(tiny_sd_folder, tmp_path_factory):
    """The tiny SD with an SD 2.1-style scheduler: prediction_type v_prediction (same scaled-linear betas)."""
    folder = tmp_path_factory.mktemp("tiny_vpred") / "pipeline"
    shutil.copytree(tiny_sd_folder, folder)
    cfg_file = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["prediction_type"] = "v_prediction"
    cfg_file.write_text(json.dumps(cfg))
    return folder


def test_loaders_read_v_prediction(tiny_vpred_folder):
    from instaflow.models.sampler import TextToImage

    pipe = TextToImage.from_pretrained(str(tiny_vpred_folder))
    assert pipe.kind == "ddpm" and pipe.scheduler_config["prediction_type"] == "v_prediction"
    assert pipe.velocity().prediction_type == "v_prediction"


def test_converted_v_teacher_matches_ddim_and_the_dpm_solver_couplings(tiny_vpred_folder):
    """From the folder: Euler on the converted velocity == diffusers' DDIM, and == the coupling stage's DPM-Solver++.

    Observed (relative error at the end): Euler (250 steps) vs DDIM (500) 1.6e-3; DPM-Solver++ vs Euler
    4.4e-2 / 9.3e-3 / 3.3e-3 / 1.9e-3 at 10 / 25 / 50 / 100 steps (it converges to the same ODE solution).
    Reading the same UNet as epsilon instead lands at 13.0 (DDIM and DPM-Solver++ alike).
    """
    from instaflow.flow import diffusion
    from instaflow.flow import solvers
    from instaflow.flow import velocity
    from instaflow.models.sampler import TextToImage

    pipe = TextToImage.from_pretrained(str(tiny_vpred_folder))
    cfg = pipe.scheduler_config
    teacher = _TimeModulatedUNet(pipe.unet).eval()  # strongly timestep dependent: a wrong time map shows
    ac = diffusion.alphas_cumprod(cfg)
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(2, 4, 8, 8, generator=g)
    states = torch.randn(2, 5, 8, generator=g)

    flow_out, _ = _run_flow(velocity.DiffusionVelocity(teacher, ac, cfg["prediction_type"]), ac, x_T, states)
    dpm_v = lambda c: velocity.velocity_field(teacher, "ddpm", c)  # noqa: E731  the teacher as DPM-Solver++ sees it
    ddim_out, _ = _run_ddim(teacher, cfg, x_T, states, cfg["prediction_type"])
    dpm_out = solvers.sample_diffusion_teacher(lambda x, t: dpm_v(cfg)(x, t, states), x_T, cfg, 50)
    assert _rel(flow_out, ddim_out) < 6e-3
    assert _rel(dpm_out, flow_out) < 6e-3
    assert _rel(ddim_out, x_T) > 0.5  # the ODE moved the sample
    # the prediction type matters: the same UNet read as epsilon lands elsewhere
    eps_cfg = {**cfg, "prediction_type": "epsilon"}
    eps_dpm = solvers.sample_diffusion_teacher(lambda x, t: dpm_v(eps_cfg)(x, t, states), x_T, eps_cfg, 50)
    assert _rel(eps_dpm, flow_out) > 0.3


def test_v_teacher_couplings_record_filters_and_reflow_runs(tiny_vpred_folder, tiny_world, tmp_path):
    """pairs_teacher on the v-prediction teacher (filters on), then reflow through the velocity_wrapper start."""
    from instaflow.models.sampler import TextToImage

    pairs = tmp_path / "pairs"
    filters = {"max_caption_chars": 80, "max_punsafe": 0.5, "missing_field": "drop"}
    data = {"predict": tiny_world.train, "resolution": 16, "eval_batch_size": 8, "num_workers": 0, "filters": filters}
    cli(["predict", "-c", BASE, "-c", tiny_yaml("pairs_teacher.yaml", tmp_path, {"model": str(tiny_vpred_folder),
                                                                            "steps": 3}, data, writer_dir=pairs)])
    meta = json.loads((pairs / "generation.json").read_text())
    assert meta["prediction_type"] == "v_prediction" and meta["solver"] == "dpm_solver++"
    assert meta["data_filters"] == {"min_caption_chars": None, "max_caption_chars": 80, "max_punsafe": 0.5,
                                    "max_pwatermark": None, "min_similarity": None, "missing_field": "drop"}
    written = read_pairs(pairs)
    assert 0 < len(written) < 64  # the recorded filter is the one applied: long captions were dropped
    assert all(len(f["txt"].decode()) <= 80 for f in written.values())
    for f in written.values():
        x1 = np.load(io.BytesIO(f["x1.npy"]))
        assert x1.shape == (4, 8, 8) and np.isfinite(x1).all()

    out = tmp_path / "models" / "rf2"
    c = cli(["fit", "-c", BASE, "-c", tiny_yaml("reflow.yaml", tmp_path, {
        "init": str(tiny_vpred_folder), "parameterization": "velocity_wrapper", "export_dir": str(out),
        "warmup_steps": 1, "grid_steps": [1]},
        {"train": str(pairs), "val": str(pairs), "batch_size": 8, "num_workers": 0},
        {"max_steps": 3, "val_check_interval": 3, "limit_val_batches": 1})])
    assert c.trainer.global_step == 3 and c.model.velocity.prediction_type == "v_prediction"
    loss = c.trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss) and loss > 0
    rf2 = TextToImage.from_pretrained(str(out))
    assert rf2.kind == "ddpm_velocity" and rf2.scheduler_config["prediction_type"] == "v_prediction"
    img = rf2.sample(["a red circle"], steps=2, guidance=1.0)
    assert img.shape == (1, 3, 16, 16) and torch.isfinite(img).all()


def test_generation_metadata_without_a_trainer_or_filters(tiny_sd_folder):
    from lightning_modules.couplings import CouplingGeneration

    gen = CouplingGeneration(model=str(tiny_sd_folder), steps=2)
    gen.configure_model()
    meta = gen.metadata()
    assert "data_filters" not in meta and meta["prediction_type"] == "epsilon"
