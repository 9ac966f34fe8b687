"""Train the embedded world's AutoencoderKL (the same class as SD's VAE), 32x32 RGB -> 8x8x4."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from instaflow.flow.losses import check_nonfinite_setting
from instaflow.flow.schedules import adamw_with_warmup, check_nonnegative, check_optimizer_settings
from instaflow.models import loading
from lightning_modules.nonfinite import DEFAULT_LIMIT, NonfiniteGuard


class AutoencoderTraining(NonfiniteGuard, L.LightningModule):
    """L1 + MSE reconstruction with a small KL term, as SD's first stage minus the GAN and LPIPS.

    The embedded images are flat-coloured shapes, so pixel losses suffice. At export the latent
    scaling factor is set to 1 / std of the validation latents, as SD's 0.18215 was chosen.

    Args:
        vae: ``AutoencoderKL`` config (ignored when ``init_from`` is given).
        init_from: folder holding ``vae/`` to start from.
        train_encoder: ``False`` fine-tunes the decoder only (as SD's ft-MSE decoder was): the
            latent space, its scaling factor and any UNet trained on it stay valid.
        warmup_steps, lr_decay_steps: linear warm-up, then cosine decay to zero at ``lr_decay_steps``
            (None: constant learning rate).
        export_dir: where the ``Export`` callback writes (``export_dir/vae``) when it names no dirpath.
        nonfinite, nonfinite_limit: a step with a non-finite loss or gradient is skipped and counted, or stops
            the run (``lightning_modules.nonfinite.NonfiniteGuard``).
    """

    def __init__(self, vae: dict | None = None, lr: float = 1e-3, kl_weight: float = 1e-6,
                 weight_decay: float = 0.0, init_from: str | None = None, train_encoder: bool = True,
                 warmup_steps: int = 0, lr_decay_steps: int | None = None, export_dir: str | None = None,
                 nonfinite: str = "skip", nonfinite_limit: int = DEFAULT_LIMIT) -> None:
        super().__init__()
        check_optimizer_settings(lr, warmup_steps, weight_decay, lr_decay_steps)
        check_nonnegative(kl_weight, "kl_weight")
        check_nonfinite_setting(nonfinite, nonfinite_limit)
        if vae is None and init_from is None:
            raise ValueError("give either a `vae` config or `init_from` (a folder holding vae/)")
        self.save_hyperparameters()
        self.vae = None
        self.latent_std: float | None = None
        self._val_latents: list[torch.Tensor] = []

    def configure_model(self) -> None:
        if self.vae is None:
            from diffusers import AutoencoderKL

            if self.hparams.init_from:
                self.vae = loading.load_vae(self.hparams.init_from).train().requires_grad_(True)
            else:
                self.vae = AutoencoderKL(**self.hparams.vae)
            if not self.hparams.train_encoder:
                for m in (self.vae.encoder, self.vae.quant_conv):
                    if m is not None:
                        m.requires_grad_(False)

    def _losses(self, x: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
        with torch.set_grad_enabled(self.hparams.train_encoder and torch.is_grad_enabled()):
            posterior = self.vae.encode(x).latent_dist
        z = posterior.sample()  # (B, 4, 8, 8)
        rec = self.vae.decode(z).sample  # (B, 3, 32, 32)
        l1, mse = (rec - x).abs().mean(), F.mse_loss(rec, x)
        kl = posterior.kl().mean() / z[0].numel()
        loss = l1 + mse + self.hparams.kl_weight * kl
        return loss, {"l1": l1, "mse": mse, "kl": kl}, posterior.mode()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, parts, _ = self._losses(batch["pixel_values"])
        self.guard_loss(loss)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in parts.items()})
        self.log("data/skipped", float(batch["skipped"]), reduce_fx="sum")
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, parts, z = self._losses(batch["pixel_values"])
        self.log("val/loss", loss, prog_bar=True)
        self.log_dict({f"val/{k}": v for k, v in parts.items()})
        self._val_latents.append(z.detach().cpu())
        if batch_idx == 0:
            self._grid = (batch["pixel_values"][:16], self.vae.decode(z[:16]).sample)

    def on_validation_epoch_end(self) -> None:
        if self._val_latents:
            z = torch.cat(self._val_latents)
            self.latent_std = float(z.std())
            self.log("val/latent_std", self.latent_std)
            self._val_latents.clear()

    def sample_grid(self, prompts: list[str], seed: int = 0) -> dict:
        real, rec = self._grid
        return {"vae_real": (real + 1) / 2, "vae_reconstruction": (rec + 1) / 2}

    def configure_optimizers(self):
        h = self.hparams
        return adamw_with_warmup([p for p in self.vae.parameters() if p.requires_grad], h.lr, h.weight_decay,
                                 h.warmup_steps, h.lr_decay_steps)

    def export(self, dirpath: str) -> Path:
        """Save ``dirpath/vae`` with the measured scaling factor in its config."""
        if not self.hparams.train_encoder:
            pass  # frozen encoder: keep the scaling factor the UNet was trained with
        elif self.latent_std is None:
            raise RuntimeError("no validation pass ran, so the latent scaling factor is unknown")
        else:
            self.vae.register_to_config(scaling_factor=round(1.0 / self.latent_std, 5))
        path = Path(dirpath) / "vae"
        self.vae.save_pretrained(path)
        return path
