"""The stacked U-Net (InstaFlow-1.7B): structure, start point, gradients, saving, and a tiny distillation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import ROOT
from tests.lightning_modules.test_chain import BASE, cli, tiny_yaml
from tests.lightning_modules.test_sd15 import write_couplings

ENTRY = ["stacked_unet", "StackedUNet2DConditionModel"]  # model_index.json: unet/stacked_unet.py, that class


def _stacked(unet):
    from instaflow.models.stacked_unet import StackedUNet2DConditionModel

    return StackedUNet2DConditionModel.from_unet(unet)


def _inputs(n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.tensor([999.0, 500.0, 1.0][:n]),
            torch.randn(n, 77, 8, generator=g))


def test_structure_no_sharing_parameter_count_and_start(tiny_sd_components):
    unet = tiny_sd_components["unet"]
    s = _stacked(unet)
    assert s.unet_1.mid_block is None and s.unet_2.mid_block is None and unet.mid_block is not None
    # the UNet's config attributes the project reads
    assert (s.config.sample_size, s.config["in_channels"], s.config.out_channels, s.config.cross_attention_dim) == \
        (unet.config.sample_size, 4, 4, 8)
    # no shared storage: not between the halves, not with the init UNet
    ptrs = [{p.data_ptr() for p in m.parameters()} for m in (s.unet_1, s.unet_2, unet)]
    assert not (ptrs[0] & ptrs[1]) and not (ptrs[0] & ptrs[2]) and not (ptrs[1] & ptrs[2])
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(s) == 2 * (n(unet) - n(unet.mid_block)) and n(unet.mid_block) > 0  # 18712 = 2 (13604 - 4248)
    # both halves carry the init weights (mid block dropped); the second's conv_out starts at zero
    init = unet.state_dict()
    for name, half in (("unet_1", s.unet_1), ("unet_2", s.unet_2)):
        for k, v in half.state_dict().items():
            if name == "unet_2" and k.startswith("conv_out."):
                assert torch.count_nonzero(v) == 0
            else:
                assert torch.equal(v, init[k]), (name, k)
    # so at step 0 the stacked net is the init UNet without its middle block, exactly
    x, t, states = _inputs()
    with torch.no_grad():
        out = s(x, t, encoder_hidden_states=states).sample
        no_mid = s.unet_1(x, t, encoder_hidden_states=states).sample
        full = unet(x, t, encoder_hidden_states=states).sample
    assert out.shape == (3, 4, 8, 8) and torch.equal(out, no_mid)
    assert not torch.allclose(out, full)  # the middle block really is gone
    assert s(x, t, states, return_dict=False)[0].shape == (3, 4, 8, 8)


def test_forward_backward_reaches_both_halves(tiny_sd_components):
    s = _stacked(tiny_sd_components["unet"]).train()
    x, t, states = _inputs()
    opt = torch.optim.SGD(s.parameters(), lr=0.1)
    grads = []
    for _ in range(2):
        opt.zero_grad()
        s(x, t, encoder_hidden_states=states).sample.pow(2).mean().backward()
        grads.append({k: (p.grad.abs().sum().item() if p.grad is not None else 0.0) for k, p in s.named_parameters()})
        opt.step()
    first, second = grads
    assert first["unet_2.conv_out.weight"] > 0 and first["unet_1.conv_in.weight"] > 0
    # the zeroed conv_out blocks the rest of the second half only until its first update
    assert first["unet_2.conv_in.weight"] == 0 and second["unet_2.conv_in.weight"] > 0
    assert second["unet_2.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"] > 0
    # activation checkpointing: same gradients
    s.zero_grad()
    s(x, t, encoder_hidden_states=states).sample.pow(2).mean().backward()
    ref = {k: p.grad.clone() for k, p in s.named_parameters()}
    s.enable_gradient_checkpointing()
    assert s.unet_2.down_blocks[0].gradient_checkpointing
    s.zero_grad()
    s(x, t, encoder_hidden_states=states).sample.pow(2).mean().backward()
    for k, p in s.named_parameters():
        torch.testing.assert_close(p.grad, ref[k], rtol=1e-5, atol=1e-7)


def test_saved_as_one_unet_folder_and_found_by_load_unet(tiny_sd_folder, tmp_path):
    from instaflow.models import loading
    from instaflow.models import saving
    from instaflow.models import unet
    from instaflow.models.stacked_unet import StackedUNet2DConditionModel

    s = _stacked(loading.load_unet(str(tiny_sd_folder)))
    with torch.no_grad():
        s.unet_2.conv_out.weight.normal_()  # a trained-looking second half
    folder = tmp_path / "stacked"
    shutil.copytree(tiny_sd_folder, folder)
    shutil.rmtree(folder / "unet")
    saving.save_pipeline(folder, s, loading.load_vae(str(tiny_sd_folder)),
                         loading.load_scheduler_config(str(tiny_sd_folder)), kind="flow")
    assert sorted(p.name for p in (folder / "unet").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors", "stacked_unet.py"]
    assert json.loads((folder / "unet" / "config.json").read_text())["_class_name"] == "StackedUNet2DConditionModel"
    source = (ROOT / "instaflow" / "models" / "stacked_unet.py").read_text()
    assert (folder / "unet" / "stacked_unet.py").read_text() == source
    assert json.loads((folder / "model_index.json").read_text())["unet"] == ENTRY
    loaded = loading.load_unet(str(folder))
    assert isinstance(loaded, StackedUNet2DConditionModel)
    assert loaded.state_dict().keys() == s.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in s.state_dict().items())
    # FSDP2's export path rebuilds from the config
    assert isinstance(unet.build_unet(dict(loaded.config)), StackedUNet2DConditionModel)
    assert type(loading.load_unet(str(tiny_sd_folder))).__name__ == "UNet2DConditionModel"  # plain folders unchanged
    with pytest.raises(ValueError, match="disagree"):
        StackedUNet2DConditionModel(unet=dict(s.unet_1.config), sample_size=64)
    with pytest.raises(ValueError, match="student must be"):
        from lightning_modules.distill import DistillTraining

        DistillTraining(init="unused", student="stacked_unet")


def test_tiny_distillation_with_a_stacked_student_exports_a_loadable_folder(tiny_sd_folder, tmp_path):
    """student: stacked on a flow init (the tiny SD read as a 2-RF): train, export, reload, sample; diffusers export
    reloaded by diffusers alone (also after a diffusers save of the reloaded pipeline), same pixels."""
    from instaflow.tools import export as export_tool
    from instaflow.models.sampler import TextToImage
    from instaflow.models.rf_pipeline import RectifiedFlowPipeline
    from instaflow.models.stacked_unet import StackedUNet2DConditionModel
    from tests.models.test_export import reload_with_diffusers

    pairs = write_couplings(tmp_path / "pairs")
    out = tmp_path / "models" / "instaflow_stacked"
    cfg = tiny_yaml("distill.yaml", tmp_path, {
        "init": str(tiny_sd_folder), "parameterization": "flow", "student": "stacked", "export_dir": str(out),
        "lr": 1e-3, "warmup_steps": 1},
        {"train": str(pairs), "val": str(pairs), "batch_size": 8, "num_workers": 0},
        {"max_steps": 3, "val_check_interval": 3, "limit_val_batches": 1})
    c = cli(["fit", "-c", BASE, "-c", cfg])
    assert isinstance(c.model.unet, StackedUNet2DConditionModel) and c.trainer.global_step == 3

    model = TextToImage.from_pretrained(str(out))
    assert isinstance(model.unet, StackedUNet2DConditionModel) and model.kind == "flow"
    assert torch.count_nonzero(model.unet.unet_2.conv_out.weight) > 0  # the second half was trained
    prompts = ["a red circle in the center on a white background", "a blue square on the left"]
    images = model.sample_images(prompts, steps=1, guidance=1.0, seeds=[7, 3])
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all() and images.std() > 0

    # the diffusers export carries the stacked U-Net as a custom component; diffusers alone reloads it
    folder = export_tool.export(str(out), tmp_path / "export")
    assert json.loads((folder / "model_index.json").read_text())["unet"] == ENTRY
    # loaded through diffusers' dynamic module and saved again, it is still named by its file (not that module)
    reloaded = RectifiedFlowPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(reloaded.unet).__name__ == "StackedUNet2DConditionModel"
    assert type(reloaded.unet).__module__ != "instaflow.models.stacked_unet"
    reloaded.save_pretrained(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "model_index.json").read_text())["unet"] == ENTRY
    cases = [{"name": name, "folder": str(f), "steps": 1, "guidance": 1.0, "prompts": prompts, "seeds": [7, 3]}
             for name, f in (("stacked", folder), ("resaved", tmp_path / "resaved"))]
    got = reload_with_diffusers(cases, tmp_path)
    for name in ("stacked", "resaved"):
        assert got[name + "/class"] == "RectifiedFlowPipeline:flow"
        assert float((got[name] - images).abs().max()) < 1e-5



def test_stacked_student_under_fsdp2_gathers_for_export(tiny_sd_folder):
    """One gloo process: the stacked student shards per block (both halves) with the bf16 policy and activation
    checkpointing, its loss matches the unsharded one, and export_unet gathers a whole stacked U-Net."""
    from tests.conftest import reference_and_sharded
    from lightning_modules.distill import DistillTraining
    from instaflow.models.sharding import is_sharded
    from instaflow.models.stacked_unet import StackedUNet2DConditionModel

    kw = dict(init=str(tiny_sd_folder), parameterization="flow", student="stacked")
    with reference_and_sharded(DistillTraining, **kw) as (ref, ref_loss, model, batch):
        assert is_sharded(model.unet) and is_sharded(model.unet.unet_2.up_blocks[1])
        loss = model.loss(batch, torch.Generator(), 0.0)
        loss.backward()
        assert loss.item() == pytest.approx(ref_loss.item(), rel=0.05)  # bf16 forward of the same weights
        whole = model.export_unet()
        assert isinstance(whole, StackedUNet2DConditionModel) and not is_sharded(whole)
        for k, v in ref.unet.state_dict().items():
            assert torch.equal(whole.state_dict()[k], v), k
