"""The SD3 family on a tiny random SD3 pipeline: our sampling equals StableDiffusion3Pipeline's, couplings
come out of the unchanged coupling stage, and a missing model fails naming it."""

from __future__ import annotations

import json

import pytest
import torch

from tests.lightning_modules.test_chain import gen_pairs, read_pairs

PROMPTS = ["a red circle in the center", "two blue squares on a white background"]


@pytest.mark.parametrize("steps,w", [(1, 1.0), (5, 4.0)])
def test_sd3_sampling_equals_the_pipeline(tiny_sd3_folder, steps, w):
    from diffusers import StableDiffusion3Pipeline

    from instaflow.models.families import SD3Model, family_of

    assert family_of(str(tiny_sd3_folder)) == "sd3"
    ours = SD3Model.from_pretrained(str(tiny_sd3_folder))
    assert ours.latent_shape == (4, 8, 8)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_folder), text_encoder_3=None, tokenizer_3=None,
                                                    feature_extractor=None, image_encoder=None)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPTS, latents=x0.clone(), num_inference_steps=steps, guidance_scale=w, height=16, width=16)
    theirs = pipe(**kw, output_type="latent").images
    x1 = ours.sample_latents(PROMPTS, steps, w, x0=x0)
    torch.testing.assert_close(x1, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.decode(x1), pipe(**kw, output_type="pt").images, atol=1e-5, rtol=0)


def test_sd3_couplings_from_the_coupling_stage(tiny_sd3_folder, tiny_world, tmp_path):
    """pairs_teacher.yaml pointed at an SD3 folder: Euler at the scheduler's sigmas, x1 = the family sampler's."""
    import numpy as np

    from instaflow.flow.noise import sample_seed
    from instaflow.models.families import SD3Model

    out = tmp_path / "pairs"
    gen_pairs(tmp_path, tiny_world, str(tiny_sd3_folder), out, solver="euler", guidance=3.0, kind=None,
              store_text_states=False, bf16=False)
    pairs = read_pairs(out)
    assert len(pairs) == 64
    meta = json.loads((out / "generation.json").read_text())
    assert (meta["family"], meta["kind"], meta["solver"], meta["latent_shape"]) == ("sd3", "flow_matching", "euler",
                                                                                     [4, 8, 8])
    model = SD3Model.from_pretrained(str(tiny_sd3_folder))
    key = sorted(pairs)[5]
    caption = pairs[key]["txt"].decode()
    want = model.sample_latents([caption], 3, 3.0, seeds=[sample_seed(key, 0)])
    got = torch.from_numpy(np.load(__import__("io").BytesIO(pairs[key]["x1.npy"])).astype(np.float32))
    torch.testing.assert_close(got, want[0], atol=2e-3, rtol=0)  # stored as float16


def test_missing_sd3_model_fails_naming_it(tmp_path):
    from instaflow.models.families import SD3Model
    from instaflow.models.loading import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="stabilityai/stable-diffusion-3-medium-diffusers"):
        SD3Model.from_pretrained("stabilityai/stable-diffusion-3-medium-diffusers")
    with pytest.raises(ModelNotFoundError, match=str(tmp_path / "no-sd3")):
        SD3Model.from_pretrained(str(tmp_path / "no-sd3"))


RELOAD_SD3 = """
import sys, torch
from diffusers import StableDiffusion3Pipeline
folder, latents, out = sys.argv[1], sys.argv[2], sys.argv[3]
pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
pipe.set_progress_bar_config(disable=True)
for n, w in ((1, 1.0), (3, 2.0)):
    images = pipe({prompts!r}, latents=torch.load(latents), num_inference_steps=n, guidance_scale=w,
                  sigmas=[1 - i / n for i in range(n)], height=16, width=16, output_type="pt").images
    torch.save(images.cpu(), out + f"_{{n}}.pt")
project = [m for m in sys.modules if m.split(".")[0] in ("instaflow", "lightning_modules", "callbacks", "data")]
assert not project, project
"""


def test_sd3_chain_reflow_distill_export_reloads_with_plain_diffusers(tiny_sd3_folder, tiny_world, tmp_path):
    """SD3 teacher couplings -> reflow (the transformer, flow-matching conversion) -> 2-RF couplings -> one-step
    distillation -> an SD3 folder that StableDiffusion3Pipeline samples as we do (uniform sigmas, shift 1)."""
    import os
    import subprocess
    import sys

    import numpy as np

    from instaflow.flow.noise import seeded_noise
    from instaflow.models.families import SD3Model, family_of
    from tests.lightning_modules.test_chain import BASE, cli, scalars, tiny_yaml

    kw = dict(solver="euler", kind=None, store_text_states=False, bf16=False)
    gen_pairs(tmp_path, tiny_world, str(tiny_sd3_folder), tmp_path / "pairs_teacher", guidance=3.0, **kw)
    models, runs = tmp_path / "models", tmp_path / "runs"
    train = {"max_steps": 12, "val_check_interval": 6, "limit_val_batches": 1, "log_every_n_steps": 1}
    pdata = {"batch_size": 8, "num_workers": 0, "shuffle_buffer": 16}
    stage = {"parameterization": "flow", "lr": 1e-3, "warmup_steps": 1}
    cli(["fit", "-c", BASE, "-c", tiny_yaml("reflow.yaml", tmp_path, {
        **stage, "init": str(tiny_sd3_folder), "export_dir": str(models / "rf2"), "grid_steps": [1, 2]},
        {**pdata, "train": str(tmp_path / "pairs_teacher"), "val": str(tmp_path / "pairs_teacher")}, train)])
    loss = scalars(next((runs / "reflow").glob("version_*")), "train/loss")
    assert len(loss) == 12 and np.isfinite(loss).all() and np.mean(loss[-3:]) < np.mean(loss[:3]), loss
    assert family_of(str(models / "rf2")) == "sd3" and SD3Model.from_pretrained(str(models / "rf2")).uniform

    gen_pairs(tmp_path, tiny_world, str(models / "rf2"), tmp_path / "pairs_rf2", src="pairs_rf2.yaml", guidance=1.5,
              **kw)
    assert len(read_pairs(tmp_path / "pairs_rf2")) == 64
    cli(["fit", "-c", BASE, "-c", tiny_yaml("distill.yaml", tmp_path, {
        **stage, "init": str(models / "rf2"), "export_dir": str(models / "instaflow")},
        {**pdata, "train": str(tmp_path / "pairs_rf2"), "val": str(tmp_path / "pairs_rf2")},
        {**train, "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                             "init_args": {"save_dir": str(runs), "name": "distill"}}})])
    loss = scalars(next((runs / "distill").glob("version_*")), "train/loss")
    assert np.mean(loss[-3:]) < np.mean(loss[:3]), loss

    student = SD3Model.from_pretrained(str(models / "instaflow"))
    x0 = seeded_noise([0, 1], student.latent_shape)  # (2, 4, 8, 8)
    torch.save(x0, tmp_path / "x0.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", RELOAD_SD3.format(prompts=PROMPTS), str(models / "instaflow"),
                           str(tmp_path / "x0.pt"), str(tmp_path / "plain")], cwd=tmp_path,
                          env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for n, w in ((1, 1.0), (3, 2.0)):
        ours = student.decode(student.sample_latents(PROMPTS, n, w, x0=x0))
        torch.testing.assert_close(torch.load(tmp_path / f"plain_{n}.pt"), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("steps,w", [(4, 1.0), (8, 5.0)])
def test_sdxl_dpm_solver_couplings_equal_the_pipeline(tiny_sdxl_folder, steps, w):
    """SDXL's conditioning (both encoders, pooled text, time ids, zeros for the empty prompt) through our
    DPM-Solver++ equals StableDiffusionXLPipeline with that scheduler, latents out."""
    from diffusers import StableDiffusionXLPipeline

    from instaflow.models.families import SDXLModel, family_of, load_teacher

    assert family_of(str(tiny_sdxl_folder)) == "sdxl"
    ours = load_teacher(str(tiny_sdxl_folder))
    assert isinstance(ours, SDXLModel) and ours.latent_shape == (4, 8, 8)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_folder))
    pipe.set_progress_bar_config(disable=True)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    kw = dict(prompt=PROMPTS, latents=x0.clone(), num_inference_steps=steps, guidance_scale=w, height=16, width=16)
    x1 = ours.sample_latents(PROMPTS, steps, w, x0=x0)
    torch.testing.assert_close(x1, pipe(**kw, output_type="latent").images, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.decode(x1), pipe(**kw, output_type="pt").images, atol=1e-5, rtol=0)


def test_sdxl_couplings_from_the_coupling_stage(tiny_sdxl_folder, tiny_world, tmp_path):
    out = tmp_path / "pairs"
    gen_pairs(tmp_path, tiny_world, str(tiny_sdxl_folder), out, guidance=5.0, kind=None, store_text_states=False,
              bf16=False)
    assert len(read_pairs(out)) == 64
    meta = json.loads((out / "generation.json").read_text())
    assert (meta["family"], meta["kind"], meta["solver"]) == ("sdxl", "ddpm", "dpm_solver++")
    assert "time ids" in meta["conditioning"]


def test_missing_sdxl_model_fails_naming_it():
    from instaflow.models.families import SDXLModel
    from instaflow.models.loading import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="stabilityai/stable-diffusion-xl-base-1.0"):
        SDXLModel.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")
    with pytest.raises(ModelNotFoundError, match="madebyollin/sdxl-vae-fp16-fix"):
        SDXLModel.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", vae="madebyollin/sdxl-vae-fp16-fix")


RELOAD_SD3_LORA = """
import sys, torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
base, lora, latents, out = sys.argv[1:5]
pipe = StableDiffusion3Pipeline.from_pretrained(base, text_encoder_3=None, tokenizer_3=None)
pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)  # uniform steps
pipe.load_lora_weights(lora)
pipe.set_progress_bar_config(disable=True)
images = pipe({prompts!r}, latents=torch.load(latents), num_inference_steps=2, guidance_scale=2.0,
              sigmas=[1.0, 0.5], height=16, width=16, output_type="pt").images
torch.save(images.cpu(), out)
assert not [m for m in sys.modules if m.split(".")[0] in ("instaflow", "lightning_modules", "callbacks", "data")]
"""


def test_sd3_lora_reflow_exports_a_transformer_lora_for_plain_diffusers(tiny_sd3_folder, tiny_world, tmp_path):
    """A LoRA on the SD3 transformer: only the adapter trains; the export's lora/ loads onto the original SD3
    folder with StableDiffusion3Pipeline.load_lora_weights and samples as the merged export does."""
    import os
    import subprocess
    import sys

    from instaflow.flow.noise import seeded_noise
    from instaflow.models.families import SD3Model
    from tests.lightning_modules.test_chain import BASE, cli, tiny_yaml

    gen_pairs(tmp_path, tiny_world, str(tiny_sd3_folder), tmp_path / "pairs", guidance=3.0, solver="euler", kind=None,
              store_text_states=False, bf16=False)
    out = tmp_path / "models" / "rf2_lora"
    cli(["fit", "-c", BASE, "-c", tiny_yaml("reflow.yaml", tmp_path, {
        "init": str(tiny_sd3_folder), "parameterization": "flow", "export_dir": str(out), "lr": 1e-2,
        "warmup_steps": 1, "grid_steps": [1], "lora_rank": 4},
        {"batch_size": 8, "num_workers": 0, "shuffle_buffer": 16, "train": str(tmp_path / "pairs"),
         "val": str(tmp_path / "pairs")}, {"max_steps": 6, "val_check_interval": 6, "limit_val_batches": 1})])
    ckpt = torch.load(next((tmp_path / "ckpt" / "reflow.yaml").glob("*.ckpt")), weights_only=False)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((out / "lora" / "lora.json").read_text())["family"] == "sd3"

    merged = SD3Model.from_pretrained(str(out))
    x0 = seeded_noise([0, 1], merged.latent_shape)
    torch.save(x0, tmp_path / "x0.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", RELOAD_SD3_LORA.format(prompts=PROMPTS), str(tiny_sd3_folder),
                           str(out / "lora"), str(tmp_path / "x0.pt"), str(tmp_path / "lora.pt")], cwd=tmp_path,
                          env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ours = merged.decode(merged.sample_latents(PROMPTS, 2, 2.0, x0=x0))
    torch.testing.assert_close(torch.load(tmp_path / "lora.pt"), ours, atol=1e-5, rtol=0)
    base = SD3Model.from_pretrained(str(tiny_sd3_folder), uniform=True)
    assert (base.decode(base.sample_latents(PROMPTS, 2, 2.0, x0=x0)) - ours).abs().max() > 1e-4  # it trained


@pytest.mark.parametrize("steps,w", [(1, 3.5), (4, 3.5)])
def test_flux_sampling_equals_the_pipeline(tiny_flux_folder, steps, w):
    """Packed latents, ids, the guidance input and dynamic-shift sigmas: our Euler on unpacked latents in our time
    equals FluxPipeline (latents packed in and out)."""
    from diffusers import FluxPipeline

    from instaflow.models.families import FluxModel, family_of, load_teacher, pack_latents, unpack_latents

    assert family_of(str(tiny_flux_folder)) == "flux"
    ours = load_teacher(str(tiny_flux_folder))
    assert isinstance(ours, FluxModel)
    ours.resolution, ours.max_sequence_length = 16, 16
    assert ours.latent_shape == (4, 8, 8)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(unpack_latents(pack_latents(x0), 8, 8), x0)
    pipe = FluxPipeline.from_pretrained(str(tiny_flux_folder))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPTS, latents=pack_latents(x0), num_inference_steps=steps, guidance_scale=w, height=16,
              width=16, max_sequence_length=16)
    x1 = ours.sample_latents(PROMPTS, steps, w, x0=x0)
    torch.testing.assert_close(pack_latents(x1), pipe(**kw, output_type="latent").images, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.decode(x1), pipe(**kw, output_type="pt").images, atol=1e-5, rtol=0)


def test_missing_flux_model_fails_naming_it():
    from instaflow.models.families import FluxModel
    from instaflow.models.loading import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="black-forest-labs/FLUX.1-dev"):
        FluxModel.from_pretrained("black-forest-labs/FLUX.1-dev")


def test_flux_couplings_from_the_coupling_stage(tiny_flux_folder, tiny_world, tmp_path):
    """pairs_teacher.yaml pointed at a Flux folder: unpacked x1 of the family's sampler, generation.json says flux."""
    import numpy as np

    from instaflow.flow.noise import sample_seed
    from instaflow.models.families import FluxModel

    out = tmp_path / "pairs"
    gen_pairs(tmp_path, tiny_world, str(tiny_flux_folder), out, solver="euler", guidance=3.5, kind=None,
              store_text_states=False, bf16=False, resolution=16)
    pairs = read_pairs(out)
    meta = json.loads((out / "generation.json").read_text())
    assert len(pairs) == 64 and (meta["family"], meta["latent_shape"]) == ("flux", [4, 8, 8])
    assert "guidance as an input" in meta["conditioning"] and meta["guidance"] == 3.5
    model = FluxModel.from_pretrained(str(tiny_flux_folder), resolution=16)
    key = sorted(pairs)[3]
    want = model.sample_latents([pairs[key]["txt"].decode()], 3, 3.5, seeds=[sample_seed(key, 0)])
    got = torch.from_numpy(np.load(__import__("io").BytesIO(pairs[key]["x1.npy"])).astype(np.float32))
    torch.testing.assert_close(got, want[0], atol=2e-3, rtol=0)  # stored as float16


RELOAD_FLUX = """
import sys, torch
from diffusers import FluxPipeline
folder, latents, out = sys.argv[1], sys.argv[2], sys.argv[3]
pipe = FluxPipeline.from_pretrained(folder)
pipe.set_progress_bar_config(disable=True)
for n in (1, 3):
    images = pipe({prompts!r}, latents=torch.load(latents), num_inference_steps=n, guidance_scale=3.5,
                  height=16, width=16, output_type="pt").images
    torch.save(images.cpu(), out + f"_{{n}}.pt")
assert not [m for m in sys.modules if m.split(".")[0] in ("instaflow", "lightning_modules", "callbacks", "data")]
"""


def test_flux_chain_reflow_distill_export_reloads_with_plain_diffusers(tiny_flux_folder, tiny_world, tmp_path):
    """Flux teacher couplings (guidance input 3.5) -> reflow -> 2-RF couplings -> distillation at that input -> a Flux
    folder (no dynamic shift, shift 1) that FluxPipeline's default sigmas sample as our uniform Euler."""
    import os
    import subprocess
    import sys

    import numpy as np

    from instaflow.models.families import FluxModel, pack_latents
    from instaflow.flow.noise import seeded_noise
    from tests.lightning_modules.test_chain import BASE, cli, scalars, tiny_yaml

    kw = dict(solver="euler", kind=None, store_text_states=False, bf16=False, resolution=16)
    gen_pairs(tmp_path, tiny_world, str(tiny_flux_folder), tmp_path / "pairs", guidance=3.5, **kw)
    models, runs = tmp_path / "models", tmp_path / "runs"
    train = {"max_steps": 8, "val_check_interval": 8, "limit_val_batches": 1, "log_every_n_steps": 1}
    data = {"batch_size": 8, "num_workers": 0, "shuffle_buffer": 16, "train": str(tmp_path / "pairs"),
            "val": str(tmp_path / "pairs")}
    stage = {"parameterization": "flow", "lr": 1e-3, "warmup_steps": 1, "guidance_input": 3.5, "resolution": 16}
    cli(["fit", "-c", BASE, "-c", tiny_yaml("reflow.yaml", tmp_path, {
        **stage, "init": str(tiny_flux_folder), "export_dir": str(models / "rf2"), "grid_steps": [1, 2]}, data, train)])
    loss = scalars(next((runs / "reflow").glob("version_*")), "train/loss")
    assert len(loss) == 8 and np.mean(loss[-3:]) < np.mean(loss[:3]), loss
    gen_pairs(tmp_path, tiny_world, str(models / "rf2"), tmp_path / "pairs_rf2", src="pairs_rf2.yaml", guidance=3.5,
              **kw)
    assert len(read_pairs(tmp_path / "pairs_rf2")) == 64
    data = {**data, "train": str(tmp_path / "pairs_rf2"), "val": str(tmp_path / "pairs_rf2")}
    cli(["fit", "-c", BASE, "-c", tiny_yaml("distill.yaml", tmp_path, {
        **stage, "init": str(models / "rf2"), "export_dir": str(models / "instaflow")}, data,
        {**train, "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                             "init_args": {"save_dir": str(runs), "name": "distill"}}})])

    student = FluxModel.from_pretrained(str(models / "instaflow"))
    assert (student.uniform, student.resolution, student.guidance_input) == (True, 16, 3.5)
    x0 = seeded_noise([0, 1], student.latent_shape)
    torch.save(pack_latents(x0), tmp_path / "x0.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", RELOAD_FLUX.format(prompts=PROMPTS), str(models / "instaflow"),
                           str(tmp_path / "x0.pt"), str(tmp_path / "plain")], cwd=tmp_path,
                          env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for n in (1, 3):
        ours = student.decode(student.sample_latents(PROMPTS, n, 1.0, x0=x0))  # the guidance input is fixed
        torch.testing.assert_close(torch.load(tmp_path / f"plain_{n}.pt"), ours, atol=1e-5, rtol=0)


RELOAD_FLUX_LORA = """
import sys, torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
base, lora, latents, out = sys.argv[1:5]
pipe = FluxPipeline.from_pretrained(base)
pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=False,
                                                             shift=1.0)  # uniform steps
pipe.load_lora_weights(lora)
pipe.set_progress_bar_config(disable=True)
images = pipe({prompts!r}, latents=torch.load(latents), num_inference_steps=2, guidance_scale=3.5, height=16,
              width=16, output_type="pt").images
torch.save(images.cpu(), out)
assert not [m for m in sys.modules if m.split(".")[0] in ("instaflow", "lightning_modules", "callbacks", "data")]
"""


def test_flux_lora_reflow_exports_a_transformer_lora_for_plain_diffusers(tiny_flux_folder, tiny_world, tmp_path):
    """A LoRA on the Flux transformer: the export's lora/ loads onto the original Flux folder with
    FluxPipeline.load_lora_weights and samples as the merged export does."""
    import os
    import subprocess
    import sys

    from instaflow.flow.noise import seeded_noise
    from instaflow.models.families import FluxModel, pack_latents
    from tests.lightning_modules.test_chain import BASE, cli, tiny_yaml

    gen_pairs(tmp_path, tiny_world, str(tiny_flux_folder), tmp_path / "pairs", guidance=3.5, solver="euler",
              kind=None, store_text_states=False, bf16=False, resolution=16)
    out = tmp_path / "models" / "rf2_lora"
    cli(["fit", "-c", BASE, "-c", tiny_yaml("reflow.yaml", tmp_path, {
        "init": str(tiny_flux_folder), "parameterization": "flow", "export_dir": str(out), "lr": 1e-2,
        "warmup_steps": 1, "grid_steps": [1], "lora_rank": 4, "guidance_input": 3.5, "resolution": 16},
        {"batch_size": 8, "num_workers": 0, "shuffle_buffer": 16, "train": str(tmp_path / "pairs"),
         "val": str(tmp_path / "pairs")}, {"max_steps": 6, "val_check_interval": 6, "limit_val_batches": 1})])
    assert json.loads((out / "lora" / "lora.json").read_text())["family"] == "flux"
    merged = FluxModel.from_pretrained(str(out))
    x0 = seeded_noise([0, 1], merged.latent_shape)
    torch.save(pack_latents(x0), tmp_path / "x0.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", RELOAD_FLUX_LORA.format(prompts=PROMPTS), str(tiny_flux_folder),
                           str(out / "lora"), str(tmp_path / "x0.pt"), str(tmp_path / "lora.pt")], cwd=tmp_path,
                          env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ours = merged.decode(merged.sample_latents(PROMPTS, 2, 3.5, x0=x0))
    torch.testing.assert_close(torch.load(tmp_path / "lora.pt"), ours, atol=1e-5, rtol=0)


RELOAD_SDXL = """
import sys, torch
from diffusers import DiffusionPipeline
folder, latents, out = sys.argv[1], sys.argv[2], sys.argv[3]
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
for n, w in ((1, 1.0), (3, 2.0)):
    images = pipe({prompts!r}, latents=torch.load(latents), num_inference_steps=n, guidance_scale=w,
                  height=16, width=16, output_type="pt").images
    torch.save(images.cpu(), out + f"_{{n}}.pt")
assert type(pipe).__name__ == "RectifiedFlowPipeline" and pipe.is_xl
assert not [m for m in sys.modules if m.split(".")[0] in ("instaflow", "lightning_modules", "callbacks", "data")]
"""


def test_sdxl_chain_reflow_distill_export_reloads_with_plain_diffusers(tiny_sdxl_folder, tiny_world, tmp_path):
    """SDXL teacher couplings -> reflow through the velocity conversion (pooled text, time ids, zeros for dropped
    captions) -> 2-RF couplings -> distillation -> make export's RectifiedFlowPipeline folder (SDXL conditioning), which plain
    diffusers samples as we do."""
    import os
    import subprocess
    import sys

    import numpy as np

    from instaflow.flow.noise import seeded_noise
    from instaflow.models.export import export
    from instaflow.models.families import SDXLModel
    from tests.lightning_modules.test_chain import BASE, cli, scalars, tiny_yaml

    kw = dict(kind=None, store_text_states=False, bf16=False)
    gen_pairs(tmp_path, tiny_world, str(tiny_sdxl_folder), tmp_path / "pairs_teacher", guidance=5.0, **kw)
    models, runs = tmp_path / "models", tmp_path / "runs"
    train = {"max_steps": 8, "val_check_interval": 8, "limit_val_batches": 1, "log_every_n_steps": 1}
    pdata = {"batch_size": 8, "num_workers": 0, "shuffle_buffer": 16}
    stage = {"parameterization": "velocity_wrapper", "lr": 1e-3, "warmup_steps": 1}
    cli(["fit", "-c", BASE, "-c", tiny_yaml("reflow.yaml", tmp_path, {
        **stage, "init": str(tiny_sdxl_folder), "export_dir": str(models / "rf2"), "grid_steps": [1, 2]},
        {**pdata, "train": str(tmp_path / "pairs_teacher"), "val": str(tmp_path / "pairs_teacher")}, train)])
    loss = scalars(next((runs / "reflow").glob("version_*")), "train/loss")
    assert len(loss) == 8 and np.mean(loss[-3:]) < np.mean(loss[:3]), loss
    assert SDXLModel.from_pretrained(str(models / "rf2")).kind == "ddpm_velocity"
    gen_pairs(tmp_path, tiny_world, str(models / "rf2"), tmp_path / "pairs_rf2", src="pairs_rf2.yaml", guidance=1.5,
              solver="euler", **kw)
    cli(["fit", "-c", BASE, "-c", tiny_yaml("distill.yaml", tmp_path, {
        **stage, "init": str(models / "rf2"), "export_dir": str(models / "instaflow")},
        {**pdata, "train": str(tmp_path / "pairs_rf2"), "val": str(tmp_path / "pairs_rf2")},
        {**train, "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                             "init_args": {"save_dir": str(runs), "name": "distill"}}})])

    student = SDXLModel.from_pretrained(str(models / "instaflow"))
    out = export(str(models / "instaflow"), tmp_path / "export")
    x0 = seeded_noise([0, 1], student.latent_shape)
    torch.save(x0, tmp_path / "x0.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", RELOAD_SDXL.format(prompts=PROMPTS), str(out),
                           str(tmp_path / "x0.pt"), str(tmp_path / "plain")], cwd=tmp_path,
                          env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for n, w in ((1, 1.0), (3, 2.0)):
        ours = student.decode(student.sample_latents(PROMPTS, n, w, x0=x0))
        torch.testing.assert_close(torch.load(tmp_path / f"plain_{n}.pt"), ours, atol=1e-5, rtol=0)


RELOAD_SDXL_LORA = """
import sys, torch
from diffusers import DiffusionPipeline
base, lora, latents, out = sys.argv[1:5]
pipe = DiffusionPipeline.from_pretrained(base, trust_remote_code=True)
pipe.load_lora_weights(lora)
pipe.set_progress_bar_config(disable=True)
images = pipe({prompts!r}, latents=torch.load(latents), num_inference_steps=2, guidance_scale=2.0, height=16,
              width=16, output_type="pt").images
torch.save(images.cpu(), out)
assert not [m for m in sys.modules if m.split(".")[0] in ("instaflow", "lightning_modules", "callbacks", "data")]
"""


def test_sdxl_lora_reflow_export_loads_onto_the_base_with_plain_diffusers(tiny_sdxl_folder, tiny_world, tmp_path):
    """A LoRA on the SDXL UNet: make export writes lora/ and lora/base; load_lora_weights on that base equals the
    merged student."""
    import os
    import subprocess
    import sys

    from instaflow.flow.noise import seeded_noise
    from instaflow.models.export import export
    from instaflow.models.families import SDXLModel
    from tests.lightning_modules.test_chain import BASE, cli, tiny_yaml

    gen_pairs(tmp_path, tiny_world, str(tiny_sdxl_folder), tmp_path / "pairs", guidance=5.0, kind=None,
              store_text_states=False, bf16=False)
    model = tmp_path / "models" / "rf2_lora"
    cli(["fit", "-c", BASE, "-c", tiny_yaml("reflow.yaml", tmp_path, {
        "init": str(tiny_sdxl_folder), "parameterization": "velocity_wrapper", "export_dir": str(model), "lr": 1e-2,
        "warmup_steps": 1, "grid_steps": [1], "lora_rank": 4},
        {"batch_size": 8, "num_workers": 0, "shuffle_buffer": 16, "train": str(tmp_path / "pairs"),
         "val": str(tmp_path / "pairs")}, {"max_steps": 6, "val_check_interval": 6, "limit_val_batches": 1})])
    ckpt = torch.load(next((tmp_path / "ckpt" / "reflow.yaml").glob("*.ckpt")), weights_only=False)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    out = export(str(model), tmp_path / "export")
    merged = SDXLModel.from_pretrained(str(model))
    x0 = seeded_noise([0, 1], merged.latent_shape)
    torch.save(x0, tmp_path / "x0.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", RELOAD_SDXL_LORA.format(prompts=PROMPTS), str(out / "lora" / "base"),
                           str(out / "lora"), str(tmp_path / "x0.pt"), str(tmp_path / "lora.pt")], cwd=tmp_path,
                          env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ours = merged.decode(merged.sample_latents(PROMPTS, 2, 2.0, x0=x0))
    torch.testing.assert_close(torch.load(tmp_path / "lora.pt"), ours, atol=1e-5, rtol=0)


def test_sdxl_teacher_decodes_with_another_vae(tiny_sdxl_folder, tmp_path):
    """The coupling stage's ``vae`` key (e.g. the fp16-fixed SDXL VAE): the teacher decodes with it, x1 unchanged."""
    from diffusers import AutoencoderKL

    from instaflow.models.families import load_teacher

    torch.manual_seed(1)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[4, 8],
                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                  layers_per_block=1, norm_num_groups=2, sample_size=16, scaling_factor=0.2).save_pretrained(
        tmp_path / "vae")
    plain, fixed = load_teacher(str(tiny_sdxl_folder)), load_teacher(str(tiny_sdxl_folder), vae=str(tmp_path / "vae"))
    assert fixed.pipe.vae.config.scaling_factor == 0.2 and plain.pipe.vae.config.scaling_factor == 0.13025
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fixed.sample_latents(PROMPTS[:1], 3, 2.0, x0=x0), plain.sample_latents(PROMPTS[:1], 3, 2.0,
                                                                                                      x0=x0))
    with pytest.raises(ValueError, match="SDXL"):
        load_teacher(str(tmp_path / "vae"), vae=str(tmp_path / "vae"))


def test_sharding_a_family_student_is_refused_by_name(tiny_sd3_folder):
    """FSDP2 sharding is written for SD UNets: an SD3 (SDXL, Flux) student under a device mesh stops with a message."""
    from lightning_modules.reflow import ReflowTraining
    from tests.conftest import one_rank_device_mesh

    with one_rank_device_mesh() as mesh:
        model = ReflowTraining(str(tiny_sd3_folder), parameterization="flow")
        model._device_mesh = mesh
        with pytest.raises(NotImplementedError, match="FSDP2 sharding of sd3 students"):
            model.configure_model()
