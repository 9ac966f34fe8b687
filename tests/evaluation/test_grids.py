"""Captioned grids: every image upscaled with its caption under it."""

from __future__ import annotations

import pytest
import torch

from instaflow.evaluation.grids import captioned_grid


def test_captioned_grid_keeps_each_image_and_writes_its_caption_beneath():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 8, 8, generator=g)
    captions = ["a red circle", "a blue square in the top left corner on a white background " * 3, "", "x", "y"]
    grid = captioned_grid(images, captions, nrow=3, scale=4, lines=2, font_px=10)
    tile, cap, pad = 32, 2 * 12 + 4, 2
    assert grid.shape == (3, 2 * (tile + cap + pad) + pad, 3 * (tile + pad) + pad)
    for i in range(5):  # the images, upscaled (nearest), at their cells
        x, y = pad + (i % 3) * (tile + pad), pad + (i // 3) * (tile + cap + pad)
        want = images[i].repeat_interleave(4, 1).repeat_interleave(4, 2)
        got = grid[:, y:y + tile, x:x + tile]
        assert (got - (want * 255).round() / 255).abs().max() < 1 / 255 + 1e-6
        strip = grid[:, y + tile:y + tile + cap, x:x + tile]
        assert (strip.min() < 0.5) == bool(captions[i])  # text drawn where there is a caption, white where not
    with pytest.raises(ValueError, match="captions"):
        captioned_grid(images, captions[:2], nrow=3)
