"""Perceptual losses on decoded pixels: LPIPS (InstaFlow's part 2) and LPIPS-Huber (Lee et al. 2024)."""

from __future__ import annotations

import torch
from torch import nn

from instaflow.flow.checks import checked_number
from instaflow.flow.losses import pseudo_huber_loss, pseudo_huber_per_sample
from instaflow.losses.base import Loss
from instaflow.models import loading
from instaflow.models.perceptual import PerceptualLoss, resize_images

FEATURES = ("lpips_vgg", "lpips_alex", "vae_encoder")


class LPIPS(Loss):
    """LPIPS-style feature distance of decoded pixels (InstaFlow sec. 3.2, part 2; Zhang et al. 2018).

    pred and target are latents of clean images (x1 and its estimate); both are decoded, the target without
    a graph, and compared by ``instaflow.models.perceptual.PerceptualLoss``.

    Args:
        features: "lpips_vgg" / "lpips_alex" (real runs; torchvision's backbone weights must be in the hub
            cache) or "vae_encoder" (the embedded world: the model's own frozen VAE encoder).
        decoder: folder or hub id of a diffusers ``AutoencoderTiny`` (e.g. TAESD) that decodes for the loss
            instead of the model's VAE (less activation memory); null decodes with the VAE. Exports keep the VAE.
        size: resize the decoded images to this many pixels (e.g. 224, LPIPS' training size) before the
            feature network; null keeps the decoded size.
    """

    compares_images = True

    def __init__(self, features: str = "lpips_vgg", decoder: str | None = None, size: int | None = None) -> None:
        super().__init__()
        if features not in FEATURES:
            raise ValueError(f"loss.init_args.features must be one of {FEATURES}, got {features!r}")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 16):
            raise ValueError(f"loss.init_args.size must be a pixel size >= 16 (e.g. 224) or null, got {size!r}")
        self.features, self.decoder_source, self.size = features, decoder, size
        self.perceptual: PerceptualLoss | None = None
        self.decoder: nn.Module | None = None

    def settings(self) -> dict:
        return {"features": self.features, "decoder": self.decoder_source, "size": self.size}

    def configure(self, vae: nn.Module | None = None) -> None:
        if self.perceptual is not None:
            return
        if vae is None:
            raise ValueError(f"{type(self).__name__} decodes latents: the stage must pass its VAE to configure()")
        self.perceptual = PerceptualLoss(self.features, vae=vae)  # frozen; not a trained network
        self.decoder = loading.load_tiny_decoder(self.decoder_source) if self.decoder_source else None
        # the stage's VAE, held without registering it (it is the stage's child already: one owner, one copy)
        self.__dict__["_vae"] = vae

    def images(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, h, w) -> pixels (B, 3, H, W) in [-1, 1] (the configured decoder, resized)."""
        decoder = self.decoder if self.decoder is not None else self.__dict__["_vae"]
        images = decoder.decode(latents / decoder.config.scaling_factor).sample
        return resize_images(images, self.size)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        if self.perceptual is None:
            raise RuntimeError(f"{type(self).__name__} is not configured: the stage calls configure(vae) first")
        with torch.no_grad():  # the target needs no graph
            target_images = self.images(target)
        return self.perceptual(self.images(pred), target_images)


class LPIPSHuber(LPIPS):
    """Pseudo-Huber on the latents plus LPIPS on the decoded pixels (Lee et al. 2024, "Improving the Training
    of Rectified Flows", sec. 4: the LPIPS-Huber premetric).

    loss = huber_weight * PH_c(pred, target) + lpips_weight * LPIPS(decode(pred), decode(target)). The paper
    compares pixels and weights the Huber term by time (its "1/t" variants); here the Huber term is on latents
    (no decode needed) and unweighted: ``huber_time_weight(t)`` is the hook that returns a (B,) weight per sample
    (None: the plain batch mean), left for the time weighting of issue 30.

    Args:
        c: pseudo-Huber scale (> 0; ``PseudoHuber``).
        huber_weight, lpips_weight: the two terms' weights (>= 0).
        features, decoder, size: as ``LPIPS``.
    """

    def __init__(self, features: str = "lpips_vgg", decoder: str | None = None, size: int | None = None,
                 c: float = 0.03, huber_weight: float = 1.0, lpips_weight: float = 1.0) -> None:
        super().__init__(features, decoder, size)
        self.c = checked_number(c, "loss.init_args.c (LPIPS-Huber)", lambda v: v > 0, "a finite number > 0 (e.g. 0.03)")
        weight = (lambda v: v >= 0), "a number >= 0"
        self.huber_weight = checked_number(huber_weight, "loss.init_args.huber_weight", *weight)
        self.lpips_weight = checked_number(lpips_weight, "loss.init_args.lpips_weight", *weight)

    def settings(self) -> dict:
        return {**super().settings(), "c": self.c, "huber_weight": self.huber_weight, "lpips_weight": self.lpips_weight}

    def huber_time_weight(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """(B,) weight of each sample's Huber term at its time ``t``, or None (unweighted); issue 30's hook."""
        return None

    def forward(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        w = self.huber_time_weight(t)
        if w is None:
            huber = pseudo_huber_loss(pred, target, self.c)
        else:
            huber = (w.to(pred.device, torch.float32) * pseudo_huber_per_sample(pred, target, self.c)).mean()
        return self.huber_weight * huber + self.lpips_weight * super().forward(pred, target, t)
