"""Stage 3 of InstaFlow, distillation: a one-step student x1_hat = x0 + v(x0, 0 | text) regressed on x1."""

from __future__ import annotations

import torch

from instaflow.flow.checks import checked_number
from instaflow.flow.losses import l2_loss, pseudo_huber_loss
from instaflow.models import loading
from instaflow.models.perceptual import PerceptualLoss, resize_images
from lightning_modules.student import FlowStudent


class DistillTraining(FlowStudent):
    """One-step student x1_hat = x0 + v(x0, 0 | text) regressed on coupled x1 (InstaFlow sec. 3.2).

    Args:
        loss_type: "l2", "pseudo_huber" or "perceptual" (decoded pixels; see ``instaflow.models.perceptual.PerceptualLoss``).
        perceptual_features: "vae_encoder" (embedded) or "lpips_vgg" (real runs).
        perceptual_decoder: folder or hub id of a diffusers ``AutoencoderTiny`` (e.g. TAESD) that decodes
            x1_hat and x1 for the perceptual loss instead of the full VAE (less activation memory);
            null decodes with the model's VAE. Exported models keep the full VAE.
        perceptual_size: resize the decoded images to this many pixels (e.g. 224, LPIPS' training
            size) before the feature network; null keeps the decoded size.
        student: "unet" trains the init's own network; "stacked" builds the two-U-Net student of
            ``instaflow.models.stacked_unet`` (InstaFlow-1.7B) from the init's UNet (an init that already is stacked
            is continued as is).
    """

    def __init__(self, init: str, parameterization: str = "raw", loss_type: str = "l2", huber_c: float = 0.03,
                 perceptual_features: str = "vae_encoder", caption_dropout: float = 0.0, grid_steps: tuple[int, ...] = (1,),
                 perceptual_decoder: str | None = None, perceptual_size: int | None = None, student: str = "unet",
                 **kw) -> None:
        super().__init__(init, parameterization, caption_dropout=caption_dropout, grid_steps=grid_steps, **kw)
        if loss_type not in ("l2", "pseudo_huber", "perceptual"):
            raise ValueError(f"loss_type must be l2, pseudo_huber or perceptual, got {loss_type!r}")
        if loss_type != "perceptual" and (perceptual_decoder is not None or perceptual_size is not None):
            raise ValueError(f"perceptual_decoder / perceptual_size only apply to loss_type perceptual, "
                             f"not {loss_type!r}")
        if loss_type == "pseudo_huber":
            checked_number(huber_c, "huber_c", lambda v: v > 0, "a finite number > 0 (e.g. 0.03)")
        if perceptual_size is not None and perceptual_size < 16:
            raise ValueError(f"perceptual_size must be a pixel size >= 16 (e.g. 224), got {perceptual_size}")
        if student not in ("unet", "stacked"):
            raise ValueError(f"student must be unet or stacked, got {student!r}")
        if student == "stacked" and kw.get("lora_rank"):
            raise ValueError("a stacked student is built from two copies of the init's UNet and trains both in "
                             "full; LoRA on it is not supported (use student: unet with lora_rank)")
        self.save_hyperparameters()

    def student_unet(self, unet: torch.nn.Module) -> torch.nn.Module:
        from instaflow.models.stacked_unet import StackedUNet2DConditionModel

        if self.hparams.student == "stacked" and not isinstance(unet, StackedUNet2DConditionModel):
            return StackedUNet2DConditionModel.from_unet(unet)  # starts as the init UNet without its mid block
        return unet

    def configure_model(self) -> None:
        super().configure_model()
        h = self.hparams
        if h.loss_type == "perceptual" and not hasattr(self, "perceptual"):
            self.perceptual = PerceptualLoss(h.perceptual_features, vae=self.vae)
            self.loss_decoder = loading.load_tiny_decoder(h.perceptual_decoder) if h.perceptual_decoder else None

    def perceptual_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, h, w) -> pixels (B, 3, H, W) in [-1, 1] for the perceptual loss (configured decoder, size)."""
        decoder = self.loss_decoder if self.loss_decoder is not None else self.vae
        images = decoder.decode(latents / decoder.config.scaling_factor).sample
        return resize_images(images, self.hparams.perceptual_size)

    def predict_x1(self, x0: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        t0 = torch.zeros(x0.shape[0], device=x0.device)
        return x0 + self.velocity(x0, t0, states)  # one Euler step over [0, 1]

    def loss(self, batch: dict, generator: torch.Generator, dropout: float) -> torch.Tensor:
        x0, x1 = batch["x0"], batch["x1"]
        x1_hat = self.predict_x1(x0, self.batch_states(batch, dropout))
        if self.hparams.loss_type == "l2":
            return l2_loss(x1_hat, x1)
        if self.hparams.loss_type == "pseudo_huber":
            return pseudo_huber_loss(x1_hat, x1, self.hparams.huber_c)
        with torch.no_grad():  # the target needs no graph
            target = self.perceptual_images(x1)
        return self.perceptual(self.perceptual_images(x1_hat), target)
