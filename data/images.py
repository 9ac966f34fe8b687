"""Decoding a shard's image bytes: only JPEG, PNG and WebP, upright, 8-bit RGB, resized and centre-cropped.

Shard bytes are untrusted (a web crawl): PIL is told which decoders it may use, so bytes of another
format under a ``.jpg`` name (EPS, which PIL hands to Ghostscript; TIFF; anything else) fail to open
and the caller counts a ``bad_image`` skip. 16-bit images are scaled to 8 bits (PIL's ``convert``
would clip them, turning a 16-bit photo white), and the EXIF orientation is applied before resizing.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # the sample members read as its image, first found wins
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")       # the PIL decoders those names stand for; no other ever runs
INT16_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # PIL's modes of 16-bit grey (and PNG's "I")


def open_image(data: bytes) -> Image.Image:
    """Decode ``data`` with PIL's JPEG, PNG or WebP decoder only (anything else raises), fully loaded."""
    img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    img.load()  # decode now so a truncated file fails here
    return img


def to_rgb8(img: Image.Image) -> Image.Image:
    """8-bit RGB; 16-bit grey is scaled (65535 -> 255), not clipped at 255 as ``convert`` would."""
    if img.mode in INT16_MODES:
        grey = np.asarray(img).astype(np.float64).clip(0, 65535) / 257.0
        img = Image.fromarray(grey.round().astype(np.uint8), "L")
    # 48-bit RGB(A) PNGs arrive as 8-bit RGB(A) already (PIL keeps the high byte of each sample)
    return img.convert("RGB")


def load_image(data: bytes, resolution: int) -> torch.Tensor:
    """Decode, turn upright (EXIF), resize the shorter side to ``resolution`` and centre-crop; (3, H, W) in [-1, 1]."""
    img = to_rgb8(ImageOps.exif_transpose(open_image(data)))
    w, h = img.size
    scale = resolution / min(w, h)
    if scale != 1.0:
        img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3)
    return x.permute(2, 0, 1).float().div(127.5).sub(1.0)  # (3, H, W)
