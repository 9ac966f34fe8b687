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
