"""The perceptual loss of distillation's part 2: feature distances of decoded pixels (LPIPS-style)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def resize_images(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, size, size), bilinear with antialiasing (differentiable); None or same size: unchanged."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class VAEEncoderFeatures(nn.Module):
    """Multi-scale activations of a (frozen) VAE encoder: the embedded world's stand-in for VGG.

    Deliberately *not* the evaluator's network, so the student is not trained on the metric's features.
    """

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.encoder = vae.encoder

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:  # images in [-1, 1]
        enc = self.encoder
        h = enc.conv_in(images)
        feats = []
        for block in enc.down_blocks:
            h = block(h)
            feats.append(h)
        feats.append(enc.mid_block(h))
        return feats


class PerceptualLoss(nn.Module):
    """Feature distance on decoded pixels, LPIPS-style: unit-normalised channels, squared difference.

    ``features``: "lpips_vgg" / "lpips_alex" (real runs; needs the LPIPS backbone weights) or
    "vae_encoder" (embedded world; needs ``vae``).
    """

    def __init__(self, features: str = "lpips_vgg", vae: nn.Module | None = None) -> None:
        super().__init__()
        self.kind = features
        if features.startswith("lpips_"):
            self.net = load_lpips(features.split("_", 1)[1])
        elif features == "vae_encoder":
            if vae is None:
                raise ValueError("features='vae_encoder' needs the VAE")
            self.net = VAEEncoderFeatures(vae)
        else:
            raise ValueError(f"unknown perceptual features {features!r}: lpips_vgg, lpips_alex or vae_encoder")
        self.net.eval().requires_grad_(False)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.kind.startswith("lpips_"):
            return self.net(pred, target).mean()
        loss = 0.0
        for fp, ft in zip(self.net(pred), self.net(target)):
            fp = fp / (fp.norm(dim=1, keepdim=True) + 1e-8)
            ft = ft / (ft.norm(dim=1, keepdim=True) + 1e-8)
            loss = loss + (fp - ft).pow(2).sum(1).mean()
        return loss


def load_lpips(net: str = "vgg") -> nn.Module:
    """LPIPS with a clear error when its backbone weights cannot be downloaded (offline)."""
    import lpips

    try:
        return lpips.LPIPS(net=net, verbose=False)
    except Exception as exn:  # torchvision raises URLError/RuntimeError when it cannot download
        raise RuntimeError(
            f"LPIPS-{net} needs torchvision's pretrained {net.upper()} backbone, which could not be loaded "
            f"({exn!r}). Offline, copy the weights file into torch's hub cache "
            f"($TORCH_HOME/hub/checkpoints, default ~/.cache/torch/hub/checkpoints) on a machine that has it, "
            f"or use perceptual features 'vae_encoder'."
        ) from exn
