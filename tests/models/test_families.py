"""What is particular to the SDXL, SD3 and Flux families, beyond the conformance test every family passes
(``test_family_conformance.py``): LoRA exports in each family's diffusers format, SDXL's other VAE, Flux's latent
packing, a missing SDXL VAE named, and FSDP2 sharding refused by family."""

from __future__ import annotations

import json

import pytest
import torch

from tests.lightning_modules.test_chain import gen_pairs

PROMPTS = ["a red circle in the center", "two blue squares on a white background"]


def test_missing_sdxl_vae_fails_naming_it():
    from instaflow.models.families.sdxl import SDXLFamily
    from instaflow.models.loading import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="madebyollin/sdxl-vae-fp16-fix"):
        SDXLFamily.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", vae="madebyollin/sdxl-vae-fp16-fix")


def test_flux_latent_packing_round_trips():
    from instaflow.models.families.flux import pack_latents, unpack_latents

    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    assert pack_latents(x0).shape == (2, 16, 16) and torch.equal(unpack_latents(pack_latents(x0), 8, 8), x0)


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
    from instaflow.models.families import load_family
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

    merged = load_family(str(out))
    x0 = seeded_noise([0, 1], merged.latent_shape)
    torch.save(x0, tmp_path / "x0.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", RELOAD_SD3_LORA.format(prompts=PROMPTS), str(tiny_sd3_folder),
                           str(out / "lora"), str(tmp_path / "x0.pt"), str(tmp_path / "lora.pt")], cwd=tmp_path,
                          env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ours = merged.decode(merged.sample_latents(PROMPTS, 2, 2.0, x0=x0))
    torch.testing.assert_close(torch.load(tmp_path / "lora.pt"), ours, atol=1e-5, rtol=0)
    base = load_family(str(tiny_sd3_folder))
    base.uniform = True
    assert (base.decode(base.sample_latents(PROMPTS, 2, 2.0, x0=x0)) - ours).abs().max() > 1e-4  # it trained


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
    from instaflow.models.families import load_family
    from instaflow.models.families.flux import pack_latents
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
    merged = load_family(str(out))
    x0 = seeded_noise([0, 1], merged.latent_shape)
    torch.save(pack_latents(x0), tmp_path / "x0.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", RELOAD_FLUX_LORA.format(prompts=PROMPTS), str(tiny_flux_folder),
                           str(out / "lora"), str(tmp_path / "x0.pt"), str(tmp_path / "lora.pt")], cwd=tmp_path,
                          env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ours = merged.decode(merged.sample_latents(PROMPTS, 2, 3.5, x0=x0))
    torch.testing.assert_close(torch.load(tmp_path / "lora.pt"), ours, atol=1e-5, rtol=0)


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
    from instaflow.models.families import load_family
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
    merged = load_family(str(model))
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

    from instaflow.models.families import load_family

    torch.manual_seed(1)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[4, 8],
                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                  layers_per_block=1, norm_num_groups=2, sample_size=16, scaling_factor=0.2).save_pretrained(
        tmp_path / "vae")
    plain, fixed = load_family(str(tiny_sdxl_folder)), load_family(str(tiny_sdxl_folder), vae=str(tmp_path / "vae"))
    assert fixed.pipe.vae.config.scaling_factor == 0.2 and plain.pipe.vae.config.scaling_factor == 0.13025
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fixed.sample_latents(PROMPTS[:1], 3, 2.0, x0=x0), plain.sample_latents(PROMPTS[:1], 3, 2.0,
                                                                                                      x0=x0))
    with pytest.raises(ValueError, match="SDXL"):
        load_family(str(tmp_path / "vae"), vae=str(tmp_path / "vae"))


def test_sharding_a_family_student_is_refused_by_name(tiny_sd3_folder):
    """FSDP2 sharding is written for SD UNets: an SD3 (SDXL, Flux) student under a device mesh stops with a message."""
    from lightning_modules.reflow import ReflowTraining
    from tests.conftest import one_rank_device_mesh

    with one_rank_device_mesh() as mesh:
        model = ReflowTraining(str(tiny_sd3_folder), parameterization="flow")
        model._device_mesh = mesh
        with pytest.raises(NotImplementedError, match="FSDP2 sharding of sd3 students"):
            model.configure_model()


def test_family_rules_are_checked_by_the_family_with_clear_messages(tiny_sd3_folder, tiny_sdxl_folder, tmp_path):
    """What used to be family-keyed branches in the stages is the family's own check, with the same messages."""
    from lightning_modules.couplings import CouplingGeneration
    from lightning_modules.distill import DistillTraining
    from lightning_modules.reflow import ReflowTraining

    with pytest.raises(ValueError, match="a flow-matching model already: use parameterization flow"):
        ReflowTraining(str(tiny_sd3_folder), parameterization="raw").configure_model()
    with pytest.raises(ValueError, match="SDXL pipeline: use parameterization velocity_wrapper"):
        ReflowTraining(str(tiny_sdxl_folder), parameterization="raw").configure_model()
    with pytest.raises(NotImplementedError, match="SD3 students train their own transformer"):
        DistillTraining(str(tiny_sd3_folder), parameterization="flow", student="stacked").configure_model()
    with pytest.raises(ValueError, match="store_text_states is not supported for the sd3 family"):
        CouplingGeneration(str(tiny_sd3_folder), solver="euler", store_text_states=True).configure_model()
    with pytest.raises(ValueError, match="solver 'dpm_solver\\+\\+' does not fit kind 'flow_matching'"):
        CouplingGeneration(str(tiny_sd3_folder)).configure_model()
    with pytest.raises(ValueError, match="SD3 pipeline \\(a flow-matching model\\): kind must be null or flow_matching"):
        CouplingGeneration(str(tiny_sd3_folder), kind="flow", solver="euler").configure_model()
    student = ReflowTraining(str(tiny_sd3_folder), parameterization="flow")
    student.configure_model()
    batch = {"caption": ["a"], "text_states": torch.zeros(1, 4, 8)}
    with pytest.raises(ValueError, match="stored text states are not supported for the sd3 family"):
        student.batch_states(batch)
    assert student.kind == "flow_matching" and student.sampler() is student.family
    assert student.unet is student.family.denoiser and student.lora_targets() == student.family.lora_targets
