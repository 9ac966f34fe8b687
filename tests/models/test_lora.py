"""LoRA students: only the adapter trains and is checkpointed; the export is a merged model plus a diffusers
LoRA that plain diffusers loads onto the base pipeline and that gives the merged model's images."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.lightning_modules.test_chain import BASE, cli, scalars
from tests.lightning_modules.test_distributed import reflow_yaml, unet_weights, write_step_shards

STEPS = 12
PROMPT = "a red circle number 3"

RELOAD = """
import sys, torch
from diffusers import DiffusionPipeline
folder, lora, out = sys.argv[1], sys.argv[2], sys.argv[3]
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
if lora != "-":
    pipe.load_lora_weights(lora)
pipe.set_progress_bar_config(disable=True)
images = pipe([{prompt!r}] * 2, num_inference_steps=2, guidance_scale=1.5, seeds=[0, 1], output_type="pt").images
torch.save(images.cpu(), out)
project = [m for m in sys.modules if m.split(".")[0] in ("instaflow", "lightning_modules", "callbacks", "data")]
assert not project, project
"""


def plain_diffusers(folder: Path, lora: Path | None, out: Path) -> torch.Tensor:
    """Sample in a fresh process that imports diffusers and torch only (no project module on its path)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", RELOAD.format(prompt=PROMPT), str(folder), str(lora or "-"),
                           str(out)], cwd=out.parent, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def lora_run(tiny_sd_folder, tmp_path_factory):
    """A tiny LoRA reflow (rank 4) on one repeated batch, with checkpoints every 3 steps and the export."""
    root = tmp_path_factory.mktemp("lora")
    pairs = write_step_shards(root / "pairs", 1, 8)  # one shard: every step sees the same batch
    src = reflow_yaml(root, tiny_sd_folder, pairs, "lora", max_steps=STEPS)
    cfg = yaml.safe_load(Path(src).read_text())
    cfg["model"]["init_args"].update(lora_rank=4, lora_alpha=4, lr=1e-2)
    Path(src).write_text(yaml.safe_dump(cfg))
    cli(["fit", "-c", BASE, "-c", src])
    return root


def test_lora_loss_falls_and_only_the_adapter_is_optimized_and_saved(lora_run, tiny_sd_folder):
    loss = scalars(next((lora_run / "lora" / "runs" / "lora").glob("version_*")), "train/loss")
    # the same batch and t every step: the loss falls at every step (B starts at zero, so step 0 is the base's)
    assert len(loss) == STEPS and all(b < a for a, b in zip(loss, loss[1:])) and loss[-1] < loss[0] - 0.05, loss
    ckpt = torch.load(next((lora_run / "lora" / "ckpt" / "reflow.yaml").glob("*step=12.ckpt")), weights_only=False)
    keys = list(ckpt["state_dict"])
    assert keys and all(k.startswith("unet.") and "lora_" in k for k in keys)  # the base is the init's
    n_lora = sum(v.numel() for v in ckpt["state_dict"].values())
    n_unet = sum(v.numel() for v in unet_weights(tiny_sd_folder).values())
    assert 0 < n_lora < 0.5 * n_unet
    state = ckpt["optimizer_states"][0]["state"]
    assert len(state) == len(keys)  # AdamW moments for the adapter only
    ema = next(v for k, v in ckpt["callbacks"].items() if k.startswith("EMA"))
    assert [t.shape for t in ema["shadow"]] == [v.shape for v in ckpt["state_dict"].values()]


def test_lora_export_merged_and_adapter_reload_with_plain_diffusers(lora_run, tiny_sd_folder, tmp_path):
    from safetensors.torch import load_file

    from instaflow.models.export import export
    from instaflow.models.sampler import TextToImage

    model = lora_run / "lora" / "export"
    assert (model / "lora" / "pytorch_lora_weights.safetensors").is_file()
    adapter = load_file(str(model / "lora" / "pytorch_lora_weights.safetensors"))
    assert adapter and all("lora" in k for k in adapter)
    merged, base = unet_weights(model), unet_weights(tiny_sd_folder)
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed and all(any(t in k for t in ("to_q", "to_k", "to_v", "to_out")) for k in changed)

    ours = TextToImage.from_pretrained(str(model)).sample_images([PROMPT] * 2, 2, 1.5, [0, 1])
    out = export(str(model), tmp_path / "export")
    theirs_merged = plain_diffusers(out, None, tmp_path / "merged.pt")
    theirs_lora = plain_diffusers(out / "lora" / "base", out / "lora", tmp_path / "lora.pt")
    torch.testing.assert_close(theirs_merged, ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs_lora, ours, atol=1e-5, rtol=0)
    without = plain_diffusers(out / "lora" / "base", None, tmp_path / "base.pt")  # the adapter matters
    assert (without - ours).abs().max() > 1e-3


def test_lora_keys_are_typed_and_checked():
    from lightning_modules.distill import DistillTraining
    from lightning_modules.reflow import ReflowTraining

    with pytest.raises(ValueError, match="lora_rank"):
        ReflowTraining("x", lora_rank=0)
    with pytest.raises(ValueError, match="stacked"):
        DistillTraining("x", student="stacked", lora_rank=4)
