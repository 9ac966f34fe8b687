"""Perceptual-loss decoding options of DistillTraining: a small AutoencoderTiny decoder and resizing before LPIPS."""

from __future__ import annotations

import pytest
import torch

from instaflow.models import perceptual

TINY_TAESD = {  # 8x8x4 latents -> 16x16 RGB (one upsampling between the two decoder stages)
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "encoder_block_out_channels": [8, 8], "decoder_block_out_channels": [8, 8],
    "num_encoder_blocks": [1, 1], "num_decoder_blocks": [1, 1],
}


class RecordingLPIPS(torch.nn.Module):
    """Stands in for LPIPS (no backbone weights here): per-sample MSE, (B, 1, 1, 1); records input shapes."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.shapes.append((tuple(a.shape), tuple(b.shape)))
        return (a - b).pow(2).mean(dim=(1, 2, 3), keepdim=True)


@pytest.fixture(scope="module")
def taesd_folder(tmp_path_factory):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("taesd") / "tiny_taesd"
    AutoencoderTiny(**TINY_TAESD).save_pretrained(folder)
    return folder


def _batch(n: int = 2):
    g = torch.Generator().manual_seed(0)
    return {"x0": torch.randn(n, 4, 8, 8, generator=g), "x1": torch.randn(n, 4, 8, 8, generator=g),
            "caption": ["a red circle", "a blue square"][:n]}


def _student(monkeypatch, init, **kw):
    from lightning_modules.distill import DistillTraining

    lpips = RecordingLPIPS()
    monkeypatch.setattr(perceptual, "load_lpips", lambda net="vgg": lpips)
    from instaflow.losses import LPIPS

    model = DistillTraining(init=str(init), parameterization="flow", loss=LPIPS("lpips_vgg", **kw))
    model.configure_model()
    return model, lpips


def test_small_decoder_and_224px_resize_feed_the_feature_network(monkeypatch, tiny_sd_folder, taesd_folder):
    from diffusers import AutoencoderTiny

    model, lpips = _student(monkeypatch, tiny_sd_folder, decoder=str(taesd_folder), size=224)
    assert isinstance(model.criterion.decoder, AutoencoderTiny)
    assert all(not p.requires_grad for p in model.criterion.decoder.parameters())  # frozen, never optimized
    batch = _batch()
    loss = model.loss(batch, torch.Generator().manual_seed(0), 0.0)
    assert lpips.shapes == [((2, 3, 224, 224), (2, 3, 224, 224))]  # decoded 16 px, resized to 224 px

    # the value is LPIPS(resize(taesd(x1_hat)), resize(taesd(x1))): the tiny decoder, not the VAE
    with torch.no_grad():
        x1_hat = model.predict_x1(batch["x0"], model.text_states(batch["caption"]))
        taesd = AutoencoderTiny.from_pretrained(taesd_folder)
        dec = lambda z: perceptual.resize_images(taesd.decode(z / taesd.config.scaling_factor).sample, 224)  # noqa: E731
        expected = (dec(x1_hat) - dec(batch["x1"])).pow(2).mean()
        sf = model.vae.config.scaling_factor
        vae = lambda z: perceptual.resize_images(model.vae.decode(z / sf).sample, 224)  # noqa: E731
        with_vae = (vae(x1_hat) - vae(batch["x1"])).pow(2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(with_vae.item() - expected.item()) > 1e-3 * expected.item()

    # gradients reach the student through the small decoder; the checkpoint keeps the UNet only
    model.unet.zero_grad()
    model.loss(batch, torch.Generator().manual_seed(0), 0.0).backward()
    assert sum(p.grad.abs().sum() for p in model.unet.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in model.criterion.decoder.parameters())
    ckpt = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and all(k.startswith("unet.") for k in ckpt["state_dict"])


def test_defaults_decode_with_the_vae_at_its_own_size(monkeypatch, tiny_sd_folder):
    model, lpips = _student(monkeypatch, tiny_sd_folder)
    assert model.criterion.decoder is None
    batch = _batch()
    loss = model.loss(batch, torch.Generator().manual_seed(0), 0.0)
    assert lpips.shapes == [((2, 3, 16, 16), (2, 3, 16, 16))]
    with torch.no_grad():
        x1_hat = model.predict_x1(batch["x0"], model.text_states(batch["caption"]))
        sf = model.vae.config.scaling_factor
        expected = (model.vae.decode(x1_hat / sf).sample - model.vae.decode(batch["x1"] / sf).sample).pow(2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_missing_small_decoder_fails_offline_with_a_clear_message(monkeypatch, tiny_sd_folder, tmp_path):
    from instaflow.models.loading import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match=r"AutoencoderTiny.*'madebyollin/taesd'.*nothing could be downloaded"):
        _student(monkeypatch, tiny_sd_folder, decoder="madebyollin/taesd")
    with pytest.raises(ModelNotFoundError, match="no such local folder"):
        _student(monkeypatch, tiny_sd_folder, decoder=str(tmp_path / "absent"))


def test_decoding_options_are_checked_at_construction():
    from instaflow.losses import LPIPS
    from lightning_modules.distill import DistillTraining

    # decoding options belong to the LPIPS loss object: the removed keys name it
    with pytest.raises(ValueError, match=r"perceptual_decoder was removed.*instaflow.losses.LPIPS.*decoder"):
        DistillTraining(init="unused", perceptual_decoder="madebyollin/taesd")
    with pytest.raises(ValueError, match=r"perceptual_size was removed.*instaflow.losses.LPIPS.*size: 224"):
        DistillTraining(init="unused", perceptual_size=224)
    with pytest.raises(ValueError, match="pixel size"):
        LPIPS("lpips_vgg", size=0)


def test_resize_images():
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    assert perceptual.resize_images(x, None) is x and perceptual.resize_images(x, 16) is x
    y = perceptual.resize_images(x, 224)
    assert y.shape == (2, 3, 224, 224)
    y.sum().backward()
    assert x.grad.abs().sum() > 0  # differentiable: the student's loss flows through it
    flat = torch.full((1, 3, 512, 512), 0.25)
    torch.testing.assert_close(perceptual.resize_images(flat, 224), torch.full((1, 3, 224, 224), 0.25))
    # antialiased downsampling averages a 1-px checkerboard instead of aliasing it
    checker = (torch.arange(512)[:, None] + torch.arange(512)[None, :]).remainder(2).float().expand(1, 3, -1, -1)
    assert perceptual.resize_images(checker, 224).std() < 0.05
