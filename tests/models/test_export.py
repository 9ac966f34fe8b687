"""Export to diffusers: the rectified-flow pipeline class, the exported folder, and a reload with diffusers alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT
from tests.lightning_modules.test_chain import BASE, cli, gen_pairs, tiny_yaml

PROMPTS = ["a red circle in the center on a white background", "a blue square on the left"]

# Runs in a fresh interpreter outside the repository: diffusers alone loads each folder and samples.
RELOAD_SCRIPT = r"""
import json, sys
import numpy as np
import torch
from diffusers import DiffusionPipeline

cases, out = json.loads(sys.argv[1]), {}
for c in cases:
    extra = {"custom_pipeline": c["custom_pipeline"]} if c.get("custom_pipeline") else {}
    pipe = DiffusionPipeline.from_pretrained(c["folder"], trust_remote_code=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=c["steps"], guidance_scale=c["guidance"], seeds=c["seeds"])
    out[c["name"]] = pipe(c["prompts"], output_type="pt", **kw).images
    out[c["name"] + "/pil"] = torch.from_numpy(np.stack([np.asarray(im) for im in pipe(c["prompts"], **kw).images]))
    out[c["name"] + "/class"] = type(pipe).__name__ + ":" + pipe.config.kind
project = sorted({m.split(".")[0] for m in sys.modules} & {"instaflow", "lightning_modules", "callbacks", "data"})
assert not project, f"the loading code imported the project: {project}"
torch.save(out, sys.argv[2])
"""


def reload_with_diffusers(cases: list[dict], tmp_path: Path) -> dict:
    """Run RELOAD_SCRIPT in a subprocess (cwd outside the repository, modules cached under tmp_path)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, json.dumps(cases), str(tmp_path / "reloaded.pt")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(tmp_path / "reloaded.pt")


def test_chain_export_and_reload_with_plain_diffusers(tiny_world, tiny_sd_folder, tmp_path):
    """Done-when of issue 4: teacher couplings -> reflow -> 2-RF couplings -> distillation on a tiny SD,
    export, reload with diffusers alone: same pixels as the project for the same seeds."""
    from PIL import Image

    from instaflow.tools import export as export_tool
    from instaflow.tools import generate
    from instaflow.models.sampler import TextToImage

    models = tmp_path / "models"
    train = {"max_steps": 4, "val_check_interval": 2, "limit_val_batches": 1}
    pdata = {"batch_size": 8, "num_workers": 0}
    gen_pairs(tmp_path, tiny_world, str(tiny_sd_folder), tmp_path / "pairs_teacher")
    cli(["fit", "-c", BASE, "-c", tiny_yaml("reflow.yaml", tmp_path, {
        "init": str(tiny_sd_folder), "export_dir": str(models / "rf2"), "warmup_steps": 1, "grid_steps": [1]},
        {**pdata, "train": str(tmp_path / "pairs_teacher"), "val": str(tmp_path / "pairs_teacher")}, train)])
    gen_pairs(tmp_path, tiny_world, str(models / "rf2"), tmp_path / "pairs_rf2", src="pairs_rf2.yaml")
    cli(["fit", "-c", BASE, "-c", tiny_yaml("distill.yaml", tmp_path, {
        "init": str(models / "rf2"), "export_dir": str(models / "instaflow"), "warmup_steps": 1},
        {**pdata, "train": str(tmp_path / "pairs_rf2"), "val": str(tmp_path / "pairs_rf2")}, train)])

    exports = {name: export_tool.export(str(models / name), tmp_path / "export" / name)
               for name in ("rf2", "instaflow")}
    folder = exports["instaflow"]
    assert {p.name for p in folder.iterdir()} >= {"unet", "vae", "scheduler", "text_encoder", "tokenizer",
                                                 "model_index.json", "pipeline_rectified_flow.py", "README.md"}
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_rectified_flow", "RectifiedFlowPipeline"]
    assert index["kind"] == "ddpm_velocity" and index["max_length"] == 77
    source = (ROOT / "instaflow" / "models" / "rf_pipeline.py").read_text()
    assert (folder / "pipeline_rectified_flow.py").read_text() == source
    assert "trust_remote_code=True" in (folder / "README.md").read_text()
    assert not (folder / "instaflow_components.json").exists()  # everything is copied in, nothing referenced

    cases = [  # (model, steps, guidance): one step without guidance, several with guidance > 1
        {"name": "instaflow_1", "folder": str(folder), "steps": 1, "guidance": 1.0},
        {"name": "instaflow_3", "folder": str(folder), "steps": 3, "guidance": 2.0},
        {"name": "rf2_4", "folder": str(exports["rf2"]), "steps": 4, "guidance": 1.5},
        # the released-weights layout (SD folder, no pipeline file) through the exported file, kind "flow"
        {"name": "released_2", "folder": str(tiny_sd_folder), "steps": 2, "guidance": 1.5,
         "custom_pipeline": str(folder / "pipeline_rectified_flow.py")},
    ]
    for c in cases:
        c.update(prompts=PROMPTS, seeds=[7, 3])
    got = reload_with_diffusers(cases, tmp_path)

    sources = {"instaflow": str(models / "instaflow"), "rf2": str(models / "rf2"), "released": str(tiny_sd_folder)}
    for c in cases:
        src = sources[c["name"].rsplit("_", 1)[0]]
        project = TextToImage.from_pretrained(src, kind="flow" if src == str(tiny_sd_folder) else None)
        expected = project.sample_images(PROMPTS, c["steps"], c["guidance"], c["seeds"])  # (2, 3, 16, 16)
        assert got[c["name"]].shape == expected.shape == (2, 3, 16, 16)
        diff = float((got[c["name"]] - expected).abs().max())
        assert diff < 1e-5, (c["name"], diff)
        kind = "flow" if c["name"] == "released_2" else "ddpm_velocity"
        assert got[c["name"] + "/class"] == f"RectifiedFlowPipeline:{kind}"
    assert not torch.allclose(got["instaflow_1"], got["instaflow_3"])  # the cases really differ

    # the project's `generate` PNG for prompt 0, seed 7 is the reloaded pipeline's PIL image: pixel for pixel up to
    # the 8-bit rounding of floats that agree to 1e-5 (generate samples prompt 0 alone, the pipeline both at once)
    out = generate.main(["--model", str(models / "instaflow"), "--steps", "1", "--seed", "7", "--num-per-prompt", "1",
                         "--scale", "1", "--prompt", PROMPTS[0], "--out", str(tmp_path / "gen")])
    png = np.asarray(Image.open(out / "000_7.png").convert("RGB")).astype(int)
    levels = np.abs(png - got["instaflow_1/pil"][0].numpy().astype(int))
    assert png.shape == (16, 16, 3) and levels.max() <= 1 and (levels > 0).mean() < 0.02, (levels.max(), levels.mean())


def test_released_flow_layout_loads_through_the_pipeline_class(tiny_sd_folder):
    """A raw "flow" UNet in SD layout (CLIP text encoder, as XCLiu/instaflow_0_9B_from_sd_1_5): the class loads it,
    feeds 1000 (1 - t), runs no unconditional pass at w = 1, and matches TextToImage(kind="flow")."""
    from instaflow.flow import paths
    from instaflow.models.sampler import TextToImage
    from instaflow.models.rf_pipeline import RectifiedFlowPipeline

    pipe = RectifiedFlowPipeline.from_pretrained(str(tiny_sd_folder))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.kind == "flow" and type(pipe.text_encoder).__name__ == "CLIPTextModel" and pipe.max_length == 77
    project = TextToImage.from_pretrained(str(tiny_sd_folder), kind="flow")

    calls = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, args, kw: calls.append((args[0].shape[0], args[1].tolist())), with_kwargs=True)
    one = pipe(PROMPTS, num_inference_steps=1, guidance_scale=1.0, seeds=[0, 1], output_type="pt").images
    assert calls == [(2, [1000.0, 1000.0])]  # one conditional pass at timestep 1000
    calls.clear()
    four = pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, seeds=[0, 1], output_type="pt").images
    hook.remove()
    assert [b for b, _ in calls] == [4] * 4  # guidance doubles the batch
    assert [ts[0] for _, ts in calls] == pytest.approx([float(paths.rf_unet_timestep(torch.tensor(t)))
                                                        for t in (0.0, 0.25, 0.5, 0.75)])
    for images, steps, w in ((one, 1, 1.0), (four, 4, 3.0)):
        expected = project.sample_images(PROMPTS, steps, w, [0, 1])
        assert float((images - expected).abs().max()) < 1e-5

    # seeds: an int s gives image j of every prompt seed s + j (generate's rule); generators give the same noise
    by_int = pipe(PROMPTS, seeds=5, num_images_per_prompt=2, output_type="pt").images
    by_list = pipe(PROMPTS, seeds=[5, 6, 5, 6], num_images_per_prompt=2, output_type="pt").images
    by_gen = pipe(PROMPTS, num_images_per_prompt=2, output_type="pt",
                  generator=[torch.Generator().manual_seed(s) for s in (5, 6, 5, 6)]).images
    assert by_int.shape == (4, 3, 16, 16) and torch.equal(by_int, by_list) and torch.equal(by_int, by_gen)
    arr = pipe(PROMPTS[0], seeds=5, output_type="np").images
    assert arr.shape == (1, 16, 16, 3) and np.allclose(arr[0], by_int[0].permute(1, 2, 0).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="3 seeds for 2 images"):
        pipe(PROMPTS, seeds=[1, 2, 3])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_pipeline_velocity_equals_the_project_conversion(tiny_sd_components, prediction_type):
    """kind "ddpm_velocity": its own epsilon/v -> velocity conversion is velocity.DiffusionVelocity, bit for bit."""
    from diffusers import DDPMScheduler

    from instaflow.flow import diffusion
    from instaflow.models import text_encoder
    from instaflow.flow import velocity
    from instaflow.models.rf_pipeline import RectifiedFlowPipeline

    c = tiny_sd_components
    cfg = {**c["scheduler_config"], "prediction_type": prediction_type}
    pipe = RectifiedFlowPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                 unet=c["unet"], scheduler=DDPMScheduler.from_config(cfg), kind="ddpm_velocity")
    reference = velocity.DiffusionVelocity(c["unet"], diffusion.alphas_cumprod(cfg), prediction_type)
    g = torch.Generator().manual_seed(0)
    x_t, states = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 77, 8, generator=g)
    t = torch.tensor([0.0, 1e-3, 0.3, 0.75, 1.0])  # both ends clamp as the project does
    with torch.no_grad():
        assert torch.equal(pipe.velocity(x_t, t, states), reference(x_t, t, states))
    # and its text states are the project's TextEncoder's, including the unconditional ""
    te = text_encoder.TextEncoder(c["tokenizer"], c["text_encoder"])
    assert torch.equal(pipe.encode_prompt(PROMPTS), te(PROMPTS))
    assert torch.equal(pipe.encode_prompt([""]), te.empty(1))


def test_export_refuses_a_diffusion_teacher(tiny_sd_folder, tmp_path):
    from instaflow.tools import export as export_tool

    with pytest.raises(ValueError, match="diffusion teacher .*kind 'ddpm'"):
        export_tool.export(str(tiny_sd_folder), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pipeline_guidance_below_one_follows_the_formula_warns_and_nan_is_refused(tiny_sd_components):
    """The exported pipeline's guidance is the project's: v_u + w (v_c - v_u) for every w != 1 (w = 0.5 is the
    mean of the conditional and unconditional velocities), with a warning below 1 (diffusers reads w <= 1 as
    "no guidance"); NaN or a negative w is refused instead of silently turning guidance off."""
    from diffusers import DDPMScheduler

    from instaflow.models.rf_pipeline import RectifiedFlowPipeline

    c = tiny_sd_components
    pipe = RectifiedFlowPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                 unet=c["unet"], scheduler=DDPMScheduler.from_config(c["scheduler_config"]),
                                 kind="ddpm_velocity")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=1, seeds=[3], output_type="latent")
    with pytest.warns(UserWarning, match="interpolates towards the unconditional model"):
        half = pipe(PROMPTS[0], guidance_scale=0.5, **kw).images
    cond = pipe(PROMPTS[0], guidance_scale=1.0, **kw).images
    with pytest.warns(UserWarning):
        uncond = pipe(PROMPTS[0], guidance_scale=0.0, **kw).images
    assert not torch.allclose(cond, uncond)  # before, w = 0 and w = 0.5 both silently gave the conditional image
    torch.testing.assert_close(half, (cond + uncond) / 2, atol=1e-5, rtol=0)  # one Euler step is linear in v
    for bad in (float("nan"), -1.0, float("inf")):
        with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
            pipe(PROMPTS[0], guidance_scale=bad, **kw)
