"""Image grids: (N, 3, H, W) in [0, 1] -> one (3, H', W') image, and PNG writing."""

from __future__ import annotations

from pathlib import Path

import torch


def make_grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (3, rows*H, nrow*W) with a 1-pixel gap."""
    from torchvision.utils import make_grid as tv_grid

    return tv_grid(images.float().clamp(0, 1), nrow=nrow, padding=1, pad_value=1.0)


def save_png(grid: torch.Tensor, path: str | Path, scale: int = 1) -> None:
    from PIL import Image

    arr = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def captioned_grid(images: torch.Tensor, captions: list[str], nrow: int, scale: int = 4, lines: int = 3,
                   font_px: int = 11) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] + one caption per image -> (3, H', W') in [0, 1]: each image upscaled by
    ``scale`` (nearest) with its caption wrapped in up to ``lines`` lines on white beneath it, so a reader
    sees which prompt (and setting) each image answers."""
    import textwrap

    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    if len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    try:
        font = ImageFont.load_default(size=font_px)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    n, _, h, w = images.shape
    tile_w, tile_h = w * scale, h * scale
    line_h = font_px + 2
    cap_h = lines * line_h + 4
    cols = min(nrow, n)
    rows = (n + cols - 1) // cols
    pad = 2
    canvas = Image.new("RGB", (cols * (tile_w + pad) + pad, rows * (tile_h + cap_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    chars = max(8, int(tile_w / (0.6 * font_px)))  # characters per line at this font size
    u8 = (images.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    for i, (img, caption) in enumerate(zip(u8, captions)):
        x = pad + (i % cols) * (tile_w + pad)
        y = pad + (i // cols) * (tile_h + cap_h + pad)
        canvas.paste(Image.fromarray(img).resize((tile_w, tile_h), Image.NEAREST), (x, y))
        wrapped = textwrap.wrap(caption, chars) or [""]
        if len(wrapped) > lines:
            wrapped = wrapped[:lines - 1] + [textwrap.shorten(" ".join(wrapped[lines - 1:]), chars, placeholder="...")]
        for j, line in enumerate(wrapped):
            draw.text((x + 1, y + tile_h + 2 + j * line_h), line, fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1).float() / 255  # a copy: PIL's buffer is read-only
