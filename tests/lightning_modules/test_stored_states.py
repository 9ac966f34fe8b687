"""Reflow and distillation from the text states the couplings store: the same loss as re-encoding."""

from __future__ import annotations

import pytest
import torch


def _batch(model, n: int = 6) -> dict:
    g = torch.Generator().manual_seed(0)
    from instaflow.flow.noise import latent_shape

    shape = (n, *latent_shape(model.unet.config))  # (B, 4, h, w)
    captions = [f"a red circle number {i}" for i in range(n)]
    return {"x0": torch.randn(shape, generator=g), "x1": torch.randn(shape, generator=g), "caption": captions}


@pytest.mark.parametrize("cls", ["reflow", "distill"])
def test_stored_states_give_the_loss_of_re_encoding(cls, tiny_sd_folder):
    from lightning_modules.distill import DistillTraining
    from lightning_modules.reflow import ReflowTraining

    model = (ReflowTraining if cls == "reflow" else DistillTraining)(str(tiny_sd_folder), parameterization="velocity_wrapper")
    model.configure_model()
    batch = _batch(model)
    # as the coupling stage stores them: the encoder's states, written as float16
    stored = {**batch, "text_states": model.text_encoder(batch["caption"]).half()}
    for dropout in (0.0, 0.5):
        losses = []
        for b in (batch, stored):
            model._gen = torch.Generator().manual_seed(3)  # the same t and caption-dropout draws for both
            losses.append(model.loss(b, torch.Generator().manual_seed(5), dropout))
        torch.testing.assert_close(losses[1], losses[0], rtol=2e-3, atol=1e-5)
    # states of another encoder (another width) are refused, not trained on
    wrong = {**batch, "text_states": torch.zeros(6, model.text_encoder.max_length, model.text_encoder.hidden_size + 1)}
    with pytest.raises(ValueError, match="another text encoder"):
        model.loss(wrong, torch.Generator().manual_seed(5), 0.0)
