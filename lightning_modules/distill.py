"""Stage 3 of InstaFlow, distillation: a one-step student x1_hat = x0 + v(x0, 0 | text) regressed on x1."""

from __future__ import annotations

import torch

from instaflow.losses import L2, Loss
from lightning_modules.student import FlowStudent, check_removed_loss_keys


class DistillTraining(FlowStudent):
    """One-step student x1_hat = x0 + v(x0, 0 | text) regressed on coupled x1 (InstaFlow sec. 3.2).

    Args:
        loss: the objective between x1_hat and x1, a ``instaflow.losses.Loss`` named by ``class_path`` (null:
            ``instaflow.losses.L2``, the paper's part 1; ``instaflow.losses.LPIPS`` its part 2;
            ``PseudoHuber``, ``LPIPSHuber``; docs/losses.md). A loss may train networks of its own.
        student: "unet" trains the init's own network; "stacked" builds the two-U-Net student of
            ``instaflow.models.stacked_unet`` (InstaFlow-1.7B) from the init's UNet (an init that already is stacked
            is continued as is).
        loss_type, huber_c, perceptual_features, perceptual_decoder, perceptual_size: removed (replaced by
            ``loss``); a config that still sets one fails, naming what to write instead.
    """

    def __init__(self, init: str, parameterization: str = "raw", loss: Loss | None = None,
                 caption_dropout: float = 0.0, grid_steps: tuple[int, ...] = (1,), student: str = "unet",
                 loss_type: str | None = None, huber_c: float | None = None, perceptual_features: str | None = None,
                 perceptual_decoder: str | None = None, perceptual_size: int | None = None, **kw) -> None:
        check_removed_loss_keys(loss_type=loss_type, huber_c=huber_c, perceptual_features=perceptual_features,
                                perceptual_decoder=perceptual_decoder, perceptual_size=perceptual_size)
        super().__init__(init, parameterization, caption_dropout=caption_dropout, grid_steps=grid_steps, **kw)
        if student not in ("unet", "stacked"):
            raise ValueError(f"student must be unet or stacked, got {student!r}")
        if student == "stacked" and kw.get("lora_rank"):
            raise ValueError("a stacked student is built from two copies of the init's UNet and trains both in "
                             "full; LoRA on it is not supported (use student: unet with lora_rank)")
        self.set_criterion(L2() if loss is None else loss)

    def student_unet(self, unet: torch.nn.Module) -> torch.nn.Module:
        from instaflow.models.stacked_unet import StackedUNet2DConditionModel

        if self.hparams.student == "stacked" and not isinstance(unet, StackedUNet2DConditionModel):
            return StackedUNet2DConditionModel.from_unet(unet)  # starts as the init UNet without its mid block
        return unet

    def configure_model(self) -> None:
        super().configure_model()
        self.configure_criterion()

    def predict_x1(self, x0: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        t0 = torch.zeros(x0.shape[0], device=x0.device)
        return x0 + self.velocity(x0, t0, states)  # one Euler step over [0, 1]

    def loss(self, batch: dict, generator: torch.Generator, dropout: float) -> torch.Tensor:
        x0, x1 = batch["x0"], batch["x1"]  # (B, 4, h, w)
        x1_hat = self.predict_x1(x0, self.batch_states(batch, dropout))
        return self.criterion(x1_hat, x1)
