"""LoRA exports at scale (issue #24): an adapter with alpha != rank reloads in plain diffusers as trained (the
safetensors carry the adapter's config), and the merge at export makes no second copy of the denoiser."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

RANK, ALPHA = 4, 16  # scale alpha / rank = 4: diffusers assuming alpha = rank would scale by 1


def lora_student(init: Path, **kw):
    """A LoRA student of ``init`` whose adapter is not zero (B drawn, seeded), as after training."""
    from lightning_modules.reflow import ReflowTraining

    module = ReflowTraining(init=str(init), parameterization="flow", lora_rank=RANK, lora_alpha=ALPHA, **kw)
    module.configure_model()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module


def test_an_sd_lora_with_alpha_4x_rank_reloads_in_plain_diffusers_as_the_merged_student(tiny_sd_folder, tmp_path):
    """StableDiffusionPipeline(base).load_lora_weights(export/lora) == the exported merged UNet == the student
    (it used to differ by the factor alpha / rank on the adapter)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    module = lora_student(tiny_sd_folder)
    out = module.export(str(tmp_path / "export"))
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_folder), safety_checker=None)
    pipe.load_lora_weights(str(out / "lora"))
    merged = UNet2DConditionModel.from_pretrained(str(out / "unet")).eval()
    g = torch.Generator().manual_seed(0)
    x, states, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 8, generator=g), torch.tensor([999, 10])
    with torch.no_grad():
        student = module.unet.eval()(x, t, states).sample
        reloaded = pipe.unet(x, t, states).sample
        folded = merged(x, t, states).sample
        base = UNet2DConditionModel.from_pretrained(str(tiny_sd_folder / "unet"))(x, t, states).sample
    assert (student - base).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(reloaded, student, atol=1e-5, rtol=0)
    torch.testing.assert_close(folded, student, atol=1e-5, rtol=0)


def test_an_sd3_lora_with_alpha_4x_rank_reloads_in_plain_diffusers(tiny_sd3_folder, tmp_path):
    """The same for an SD3 transformer LoRA: StableDiffusion3Pipeline.load_lora_weights on the base."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    module = lora_student(tiny_sd3_folder)
    out = module.export(str(tmp_path / "export"))
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_folder), text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(str(out / "lora"))
    merged = SD3Transformer2DModel.from_pretrained(str(out / "transformer")).eval()
    cfg = merged.config
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(2, cfg.in_channels, 8, 8, generator=g),
              encoder_hidden_states=torch.randn(2, 5, cfg.joint_attention_dim, generator=g),
              pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=g), timestep=torch.tensor([999, 10]))
    with torch.no_grad():
        student = module.unet.eval()(**kw).sample
        reloaded = pipe.transformer(**kw).sample
        folded = merged(**kw).sample
    torch.testing.assert_close(reloaded, student, atol=1e-5, rtol=0)
    torch.testing.assert_close(folded, student, atol=1e-5, rtol=0)


class NewStorage(TorchDispatchMode):
    """Counts the bytes of every new tensor storage an operation creates (views and in-place results share theirs)."""

    def __init__(self) -> None:
        super().__init__()
        self.total, self.largest = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                self.total += t.untyped_storage().nbytes()
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_the_merge_at_export_copies_only_the_adapted_layers(tiny_sd_folder, tmp_path):
    """The export's merged UNet equals peft's merge of a deep copy (the old way) to 1e-6, the student's weights are
    bit-identical afterwards, and the merge allocates one adapted layer at a time, never a second UNet.

    Measured (tiny SD, rank 4 on to_q/k/v/out): the deep-copy merge creates about 68 kB of new storage, more than
    the whole UNet (60 kB); ``lora.merged`` creates 3 x the adapted layers' 4 kB (copy, B A, its scaling), at most
    one layer (256 B) per tensor, and keeps only the 4 kB of merged weights: everything else is the student's own."""
    from safetensors.torch import load_file

    from instaflow.models import lora

    module = lora_student(tiny_sd_folder)
    unet = module.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    old = copy.deepcopy(unet)
    old.fuse_lora()
    old.unload_lora()
    out = module.export(str(tmp_path / "export"))
    exported = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert exported.keys() == old.state_dict().keys()
    for k, v in old.state_dict().items():
        torch.testing.assert_close(exported[k], v, atol=1e-6, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())  # the student is untouched

    adapted = [m.get_base_layer().weight for m in unet.modules() if isinstance(m, lora_layer())]
    adapted_bytes = sum(w.untyped_storage().nbytes() for w in adapted)
    whole = sum(t.untyped_storage().nbytes() for t in old.state_dict().values())
    with NewStorage() as deep:
        copy.deepcopy(unet).fuse_lora()
    with NewStorage() as ours:
        plain = lora.merged(unet)
    assert deep.total >= whole  # the old way: a second UNet
    assert ours.total <= 3 * adapted_bytes < whole / 4
    assert ours.largest <= max(w.untyped_storage().nbytes() for w in adapted)
    student = {t.untyped_storage().data_ptr() for t in unet.state_dict().values()}
    kept = sum(t.untyped_storage().nbytes() for t in plain.state_dict().values()
               if t.untyped_storage().data_ptr() not in student)
    assert kept == adapted_bytes


def test_the_best_checkpoint_network_shares_the_frozen_base(tiny_sd_folder):
    """unet_from_state (Export(weights=best)) takes the adapter from the state and shares the frozen base with the
    live student (no second UNet); the student's own adapter stays as it was."""
    module = lora_student(tiny_sd_folder)
    state = {k: torch.full_like(v, 0.5) for k, v in module.unet.state_dict().items() if "lora_" in k}
    before = {k: v.clone() for k, v in module.unet.state_dict().items()}
    with NewStorage() as made:
        net = module.unet_from_state(state)
    got, live = net.state_dict(), module.unet.state_dict()
    for k in live:
        if k in state:
            assert torch.equal(got[k], state[k]) and got[k].data_ptr() != live[k].data_ptr(), k
        else:
            assert got[k].data_ptr() == live[k].data_ptr(), k  # shared, not copied
    assert all(torch.equal(before[k], v) for k, v in live.items())
    whole = sum(v.untyped_storage().nbytes() for k, v in live.items() if k not in state)
    assert made.total < whole / 4


def lora_layer() -> type:
    from peft.tuners.lora import LoraLayer

    return LoraLayer


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
