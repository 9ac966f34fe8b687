"""What the SANA family needed beyond SD3's shape (``instaflow/models/families/sana.py``): the text attention
mask carried through guidance, the pipeline's instruction-prefixed prompt, the empty prompt without it as
the unconditional embedding; its LoRA format and its experiments. Sampling = SanaPipeline and the chain to a
plain-diffusers reload are its row of ``test_family_conformance.py``."""

from __future__ import annotations

import pytest
import torch

PROMPTS = ["a red circle in the center", "two blue squares on a white background"]


@pytest.fixture(scope="module")
def sana(tiny_sana_folder):
    from instaflow.models.families import load_family

    return load_family(str(tiny_sana_folder))


def test_the_folder_is_read_as_sana(sana, tiny_sana_folder):
    from instaflow.models.families import family_class, forbidden_names
    from instaflow.models.families.sana import SanaFamily, pipeline_instruction

    assert family_class(str(tiny_sana_folder)) is SanaFamily and isinstance(sana, SanaFamily)
    assert {"sana", "SANA", "SanaPipeline", "SanaFamily"} <= forbidden_names()
    assert (sana.kind, sana.latent_shape, sana.uniform, sana.max_sequence_length) == ("flow_matching", (4, 8, 8),
                                                                                      False, 300)
    assert sana.instruction == pipeline_instruction() and sana.instruction[-1] == "User Prompt: "
    assert set(sana.frozen_modules()) == {"vae", "text_encoders"}
    t = sana.time_grid(4)  # the scheduler's shift-3 sigmas: 1 - sigma, 0 -> 1
    assert t[0] == pytest.approx(0.0, abs=1e-6) and t[-1] == 1.0 and (t[1] - t[0]) < 0.25


def test_the_released_folders_dpm_solver_gives_its_flow_sigmas_as_the_grid(tiny_sana_folder, tmp_path):
    """The released SANA folders name DPM-Solver++ with flow sigmas (shift 3): Euler steps at those sigmas; a
    saved student carries FlowMatchEuler with shift 1 instead (uniform steps in plain diffusers)."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    from instaflow.models.families import load_family

    family = load_family(str(tiny_sana_folder))
    family.pipe.scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                        flow_shift=3.0)
    reference = DPMSolverMultistepScheduler.from_config(family.pipe.scheduler.config)
    reference.set_timesteps(5)
    t = family.time_grid(5)
    assert len(t) == 6 and t[-1] == 1.0 and bool((t[1:] > t[:-1]).all())
    torch.testing.assert_close(t, 1.0 - reference.sigmas.double(), atol=0, rtol=0)
    family.save(tmp_path / "saved")
    saved = FlowMatchEulerDiscreteScheduler.from_pretrained(str(tmp_path / "saved"), subfolder="scheduler")
    assert saved.config.shift == 1.0 and load_family(str(tmp_path / "saved")).uniform


def test_the_mask_hides_the_padding_and_survives_guidance(sana):
    from instaflow.models.families.sana import SanaConditioning

    cond, uncond = sana.encode(PROMPTS, 2.0)
    assert cond.states.shape == uncond.states.shape == (2, 300, 16) and cond.mask.shape == (2, 300)
    assert uncond.mask.sum(1).tolist() == [1, 1]  # "" is <bos> alone: the rest is padding
    both = type(cond).cat([uncond, cond])
    assert isinstance(both, SanaConditioning) and torch.equal(both.mask, torch.cat([uncond.mask, cond.mask]))
    assert torch.equal(both.to(torch.float16).mask, both.mask)
    v = sana.velocity()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.2, 0.7])
    unmasked = SanaConditioning(uncond.states, mask=torch.ones_like(uncond.mask))
    assert not torch.allclose(v(x, t, uncond), v(x, t, unmasked), atol=1e-4)  # the padding would be seen
    tail = SanaConditioning(uncond.states.clone(), mask=uncond.mask)
    tail.states[:, 1:] = torch.randn_like(tail.states[:, 1:])  # what the mask hides changes nothing
    torch.testing.assert_close(v(x, t, tail), v(x, t, uncond), atol=1e-6, rtol=0)


def test_a_dropped_caption_trains_on_the_unconditional_embedding(sana):
    """The empty prompt *without* the instruction (what guidance subtracts), not the instruction plus ""."""
    captions = ["", PROMPTS[0]]
    cond = sana.encode(captions, 1.0)[0]
    dropped = sana._dropped_cond(cond, captions)
    uncond = sana.encode(PROMPTS, 2.0)[1]
    assert not torch.allclose(cond.states[0], uncond.states[0])  # the instruction was encoded with ""
    torch.testing.assert_close(dropped.states[0], uncond.states[0], atol=0, rtol=0)
    assert torch.equal(dropped.mask[0], uncond.mask[0])
    torch.testing.assert_close(dropped.states[1], cond.states[1], atol=0, rtol=0)
    everything = sana.encode_for_training(list(PROMPTS), 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(everything.states, uncond.states, atol=0, rtol=0)


RELOAD_SANA_LORA = """
import sys, torch
from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline
base, lora, latents, out = sys.argv[1:5]
pipe = SanaPipeline.from_pretrained(base)
pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)  # uniform steps
pipe.load_lora_weights(lora)
pipe.set_progress_bar_config(disable=True)
images = pipe({prompts!r}, latents=torch.load(latents), num_inference_steps=2, guidance_scale=2.0, sigmas=[1.0, 0.5],
              height=32, width=32, use_resolution_binning=False, output_type="pt").images
torch.save(images.cpu(), out)
assert not [m for m in sys.modules if m.split(".")[0] in ("instaflow", "lightning_modules", "callbacks", "data")]
"""


def test_a_sana_lora_loads_onto_the_base_with_plain_diffusers(tiny_sana_folder, tmp_path):
    """The family's LoRA format (``SanaLoraLoaderMixin``, alpha in the metadata): SanaPipeline.load_lora_weights
    on the original folder samples as the merged export does."""
    import json
    import os
    import subprocess
    import sys

    from instaflow.flow.noise import seeded_noise
    from instaflow.models import lora
    from instaflow.models.families import load_family

    family = load_family(str(tiny_sana_folder))
    net = lora.add_lora(family.denoiser, 4, 8.0, family.lora_targets)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter (peft starts lora_B at zero)
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    out = lora.save_lora(net, tmp_path / "export", str(tiny_sana_folder), 4, 8.0, family.lora_targets, family)
    assert json.loads((out / "lora.json").read_text())["family"] == "sana"
    merged = load_family(str(family.save(tmp_path / "export", lora.merged(net))))
    assert merged.uniform and merged.name == "sana"
    x0 = seeded_noise([0, 1], merged.latent_shape)  # (2, 4, 8, 8)
    torch.save(x0, tmp_path / "x0.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", RELOAD_SANA_LORA.format(prompts=PROMPTS), str(tiny_sana_folder),
                           str(out), str(tmp_path / "x0.pt"), str(tmp_path / "lora.pt")], cwd=tmp_path,
                          env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ours = merged.decode(merged.sample_latents(PROMPTS, 2, 2.0, x0=x0))
    torch.testing.assert_close(torch.load(tmp_path / "lora.pt"), ours, atol=1e-5, rtol=0)
    base = load_family(str(tiny_sana_folder))
    base.uniform = True
    assert (base.decode(base.sample_latents(PROMPTS, 2, 2.0, x0=x0)) - ours).abs().max() > 1e-4  # the adapter acts


@pytest.mark.parametrize("stem", ["pairs_teacher", "reflow", "pairs_rf2", "distill"])
def test_sana_experiment_instantiates_with_the_tiny_sana(stem, tiny_sana_folder, tiny_world, tmp_path):
    """experiments/sana/: each file parses, takes the tiny SANA by override and runs its stage's step; the
    stated global batch is what the trainer builds."""
    from tests.conftest import ROOT
    from tests.lightning_modules.test_sd15 import cli, config_chain, stated_global_batch, write_couplings

    exp = ROOT / "experiments" / "sana" / f"{stem}.yaml"
    args = ["--trainer.default_root_dir", str(tmp_path / "root"), "--trainer.logger.init_args.save_dir",
            str(tmp_path / "runs")]
    if stem.startswith("pairs"):
        args += ["--model.init_args.model", str(tiny_sana_folder), "--data.init_args.predict", tiny_world.train,
                 "--data.init_args.num_workers", "0", "--data.init_args.filters.missing_field", "keep"]
    else:
        pairs = write_couplings(tmp_path / "pairs", shape=(4, 8, 8))
        args += ["--model.init_args.init", str(tiny_sana_folder), "--data.init_args.train", str(pairs),
                 "--data.init_args.val", str(pairs), "--data.init_args.num_workers", "0"]
    c = cli([*config_chain(exp), *args])
    model, dm, trainer = c.model, c.datamodule, c.trainer
    model.configure_model()
    h = model.hparams
    if stem.startswith("pairs"):
        assert (h.kind, h.solver, h.store_text_states) == ("flow_matching", "euler", False)
        batch = next(iter(dm.predict_dataloader()))
        out = model.predict_step({k: (v[:2] if isinstance(v, list) else v) for k, v in batch.items()}, 0)
        assert out["x1"].shape == (2, 4, 8, 8) and torch.isfinite(out["x1"]).all()
        assert model.metadata()["family"] == "sana"
        return
    total, _ = stated_global_batch(exp)
    assert total == trainer.num_nodes * trainer.num_devices * dm.batch_size * trainer.accumulate_grad_batches
    assert h.parameterization == "flow" and model.kind == "flow_matching"
    loss = model.loss(next(iter(dm.train_dataloader())), torch.Generator().manual_seed(0), 0.1)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_the_architecture_file_rebuilds_sana_1600m():
    """instaflow/models/architectures/sana_1600m.json: the model card's 1.6B transformer and 2.61B Gemma-2-2B."""
    from instaflow.tools import memory

    c = memory.count("sana_1600m", lora_rank=4)
    assert 1.55e9 < c["denoiser"] < 1.65e9 and 2.60e9 < c["frozen"]["text_encoder"] < 2.62e9
    assert set(c["frozen"]) == {"text_encoder", "vae"} and 0 < c["lora"] < 0.01 * c["denoiser"]
