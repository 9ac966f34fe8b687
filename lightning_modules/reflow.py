"""Stage 2 (reflow, the 2-Rectified Flow) and stage 3 (one-step distillation) as LightningModules.

Both train a copy of a model's UNet on stored couplings (x0, x1, caption); they differ in where
on the path they train and what they regress:
- reflow: x_t = t x1 + (1 - t) x0 at t from a chosen distribution, target x1 - x0;
- distillation: only t = 0, prediction x1_hat = x0 + v(x0, 0), loss against x1 (L2, pseudo-Huber,
  or a perceptual loss on decoded pixels).
The math lives in ``flows`` and ``losses``; these modules orchestrate.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from lightning_modules.optim import adamw_with_warmup
from lightning_modules import flows, losses, models, sampling, sharding
from lightning_modules.teacher_train import drop_captions


class FlowStudent(L.LightningModule):
    """Shared plumbing: load the init model, encode text, sample grids, export a pipeline folder.

    Args:
        init: pipeline folder (or hub id) whose UNet is the starting point.
        parameterization: "raw" trains the UNet as a rectified-flow UNet fed 1000 (1 - t) (the
            paper's choice: an epsilon teacher's raw weights first sit on a plateau while they
            switch to predicting velocity); "velocity_wrapper" keeps a diffusion UNet's own
            parameterization and trains it through the analytic epsilon -> velocity conversion;
            "flow" continues a model that already is a rectified flow (e.g. the 2-RF).
        export_dir: where ``callbacks.export.Export`` writes the trained pipeline folder.
        fsdp_mixed_precision: under ModelParallelStrategy (FSDP2), "bf16" all-gathers parameters in
            bf16 and reduces gradients in fp32 (``MixedPrecisionPolicy``); null keeps fp32.
        activation_checkpointing: recompute the UNet blocks' activations in the backward pass
            (diffusers' gradient checkpointing), on any strategy.
    """

    def __init__(self, init: str, parameterization: str = "raw", export_dir: str | None = None,
                 caption_dropout: float = 0.1,
                 lr: float = 1e-4, warmup_steps: int = 100, weight_decay: float = 0.0,
                 grid_steps: tuple[int, ...] = (1, 25), grid_guidance: float = 1.5, text_cache_size: int = 100_000,
                 seed: int = 0, fsdp_mixed_precision: str | None = None,
                 activation_checkpointing: bool = False) -> None:
        super().__init__()
        if parameterization not in ("raw", "velocity_wrapper", "flow"):
            raise ValueError(f"parameterization must be raw, velocity_wrapper or flow, got {parameterization!r}")
        self.save_hyperparameters()
        self.unet = None
        self.strict_loading = False  # checkpoints hold the trainable UNet only

    def configure_model(self) -> None:
        if self.unet is not None:
            return
        h = self.hparams
        self.vae = models.load_vae(h.init)
        self.text_encoder = models.load_text_encoder(h.init, cache_size=h.text_cache_size)
        self.scheduler_config = models.load_scheduler_config(h.init)
        self.components = models.component_sources(h.init)
        self.unet = self.student_unet(models.load_unet(h.init)).train()
        if h.parameterization == "velocity_wrapper":
            alphas = models.alphas_cumprod(self.scheduler_config)
            self.velocity = models.DiffusionVelocity(self.unet, alphas, self.scheduler_config["prediction_type"])
        else:
            self.velocity = models.RectifiedFlowVelocity(self.unet)
        # each data-parallel rank draws its own t and caption dropout (rank 0 = the single-device draws)
        self._gen = torch.Generator().manual_seed(h.seed + self.global_rank)
        if h.activation_checkpointing:
            self.unet.enable_gradient_checkpointing()
        mesh = getattr(self, "_device_mesh", None)  # set by ModelParallelStrategy before this hook
        if mesh is not None:
            sharding.check_callbacks(self._trainer)
            sharding.shard_unet(self.unet, mesh, h.fsdp_mixed_precision)
        elif h.fsdp_mixed_precision is not None:
            raise ValueError("fsdp_mixed_precision needs trainer.strategy ModelParallelStrategy (FSDP2, see "
                             "experiments/sharding/fsdp2.yaml); on one device or DDP use trainer.precision: bf16-mixed")

    def student_unet(self, unet: torch.nn.Module) -> torch.nn.Module:
        """The trainable network built from the init's UNet (the UNet itself; DistillTraining may stack it)."""
        return unet

    @property
    def kind(self) -> str:
        return "ddpm_velocity" if self.hparams.parameterization == "velocity_wrapper" else "flow"

    def text_states(self, captions: list[str], dropout: float = 0.0) -> torch.Tensor:
        if dropout:
            captions = drop_captions(captions, dropout, self._gen)
        return self.text_encoder(captions)  # (B, L, D)

    def _check(self, loss: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.global_step}; "
                                     "lower the learning rate or check the couplings")
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._check(self.loss(batch, self._gen, self.hparams.caption_dropout))
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the global batch's loss on every strategy
        self.log("data/skipped", float(batch["skipped"]), reduce_fx="sum")
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        g = torch.Generator().manual_seed(1000 + batch_idx)  # same t every validation
        self.log("val/loss", self.loss(batch, g, 0.0), prog_bar=True)

    @torch.no_grad()
    def sample_latents(self, prompts: list[str], steps: int, guidance: float, seeds: list[int]) -> torch.Tensor:
        x0 = sampling.seeded_noise(seeds, tuple(self.unet.config[k] for k in ("in_channels",)) +
                                   _hw(self.unet.config.sample_size)).to(self.device)
        cond = self.text_encoder(prompts)
        uncond = self.text_encoder.empty(len(prompts)) if guidance > 1.0 else None
        return flows.sample_euler(flows.guided(self.velocity, cond, uncond, guidance), x0, flows.time_grid(steps))

    @torch.no_grad()
    def sample_images(self, prompts: list[str], steps: int, guidance: float, seeds: list[int],
                      batch_size: int = 256) -> torch.Tensor:
        """Decoded samples (N, 3, H, W) in [0, 1], prompt i from noise seed ``seeds[i]``."""
        out = []
        for i in range(0, len(prompts), batch_size):
            x1 = self.sample_latents(prompts[i:i + batch_size], steps, guidance, seeds[i:i + batch_size])
            out.append(sampling.decode(self.vae, x1))
        return torch.cat(out)

    @torch.no_grad()
    def sample_grid(self, prompts: list[str], seed: int = 0) -> dict:
        seeds = list(range(seed, seed + len(prompts)))
        out = {}
        for n in self.hparams.grid_steps:
            w = self.hparams.grid_guidance if n > 1 else 1.0
            out[f"euler{n}_w{w:g}"] = sampling.decode(self.vae, self.sample_latents(prompts, n, w, seeds))
        return out

    def configure_optimizers(self):
        h = self.hparams
        # the UNet only: VAE and text encoder are frozen and never reach the optimizer
        return adamw_with_warmup([p for p in self.unet.parameters() if p.requires_grad], h.lr, h.weight_decay,
                                 h.warmup_steps)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if sharding.is_sharded(self.unet):
            # a distributed checkpoint is loaded into the whole module's state dict, which fails on any
            # missing key: keep the frozen parts (saved once, not per rank: they are replicated)
            return
        sd = checkpoint["state_dict"]
        for k in [k for k in sd if not k.startswith("unet.")]:
            del sd[k]

    def export_unet(self) -> torch.nn.Module | None:
        """The UNet with full weights for ``export``; under FSDP2 a gathered copy on rank 0 (None elsewhere).

        Collective under sharding: every rank must call it (``callbacks.export.Export`` does).
        """
        if not sharding.is_sharded(self.unet):
            return self.unet
        state = sharding.full_state_dict(self.unet)
        if self.global_rank != 0:
            return None
        unet = models.build_unet(dict(self.unet.config))
        unet.load_state_dict(state)
        return unet

    def export(self, dirpath: str, unet: torch.nn.Module | None = None) -> Path:
        if unet is None:
            if sharding.is_sharded(self.unet):
                raise RuntimeError("the UNet is FSDP2-sharded: gather it first on every rank with export_unet() "
                                   "and pass it as export(dirpath, unet=...) on rank 0 (callbacks.export.Export does)")
            unet = self.unet
        te = self.components["text_encoder"]
        package = te if isinstance(te, str) and te.startswith(models.PACKAGE_PREFIX) else None
        return models.save_pipeline(dirpath, unet, self.vae, self.scheduler_config, text_encoder=package,
                                    max_length=self.text_encoder.max_length, text_encoder_module=self.text_encoder,
                                    kind=self.kind)


def _hw(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


class ReflowTraining(FlowStudent):
    """v(x_t, t | text) -> x1 - x0 on the couplings (InstaFlow sec. 3; Liu et al. 2022, eq. 1)."""

    def __init__(self, init: str, parameterization: str = "raw", time_distribution: str = "uniform",
                 time_kwargs: dict | None = None, **kw) -> None:
        super().__init__(init, parameterization, **kw)
        self.save_hyperparameters()

    def loss(self, batch: dict, generator: torch.Generator, dropout: float) -> torch.Tensor:
        x0, x1 = batch["x0"], batch["x1"]  # (B, 4, h, w)
        t = flows.sample_t(self.hparams.time_distribution, x0.shape[0], generator=generator,
                           **(self.hparams.time_kwargs or {})).to(x0.device)
        x_t = flows.interpolate(x0, x1, t)
        v_pred = self.velocity(x_t, t, self.text_states(batch["caption"], dropout))
        return losses.l2_loss(v_pred, flows.velocity_target(x0, x1))


class DistillTraining(FlowStudent):
    """One-step student x1_hat = x0 + v(x0, 0 | text) regressed on coupled x1 (InstaFlow sec. 3.2).

    Args:
        loss_type: "l2", "pseudo_huber" or "perceptual" (decoded pixels; see ``losses.PerceptualLoss``).
        perceptual_features: "vae_encoder" (embedded) or "lpips_vgg" (real runs).
        perceptual_decoder: folder or hub id of a diffusers ``AutoencoderTiny`` (e.g. TAESD) that decodes
            x1_hat and x1 for the perceptual loss instead of the full VAE (less activation memory);
            null decodes with the model's VAE. Exported models keep the full VAE.
        perceptual_size: resize the decoded images to this many pixels (e.g. 224, LPIPS' training
            size) before the feature network; null keeps the decoded size.
        student: "unet" trains the init's own network; "stacked" builds the two-U-Net student of
            ``stacked_unet`` (InstaFlow-1.7B) from the init's UNet (an init that already is stacked
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
        if perceptual_size is not None and perceptual_size < 16:
            raise ValueError(f"perceptual_size must be a pixel size >= 16 (e.g. 224), got {perceptual_size}")
        if student not in ("unet", "stacked"):
            raise ValueError(f"student must be unet or stacked, got {student!r}")
        self.save_hyperparameters()

    def student_unet(self, unet: torch.nn.Module) -> torch.nn.Module:
        from lightning_modules.stacked_unet import StackedUNet2DConditionModel

        if self.hparams.student == "stacked" and not isinstance(unet, StackedUNet2DConditionModel):
            return StackedUNet2DConditionModel.from_unet(unet)  # starts as the init UNet without its mid block
        return unet

    def configure_model(self) -> None:
        super().configure_model()
        h = self.hparams
        if h.loss_type == "perceptual" and not hasattr(self, "perceptual"):
            self.perceptual = losses.PerceptualLoss(h.perceptual_features, vae=self.vae)
            self.loss_decoder = models.load_tiny_decoder(h.perceptual_decoder) if h.perceptual_decoder else None

    def perceptual_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, h, w) -> pixels (B, 3, H, W) in [-1, 1] for the perceptual loss (configured decoder, size)."""
        decoder = self.loss_decoder if self.loss_decoder is not None else self.vae
        images = decoder.decode(latents / decoder.config.scaling_factor).sample
        return losses.resize_images(images, self.hparams.perceptual_size)

    def predict_x1(self, x0: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        t0 = torch.zeros(x0.shape[0], device=x0.device)
        return x0 + self.velocity(x0, t0, states)  # one Euler step over [0, 1]

    def loss(self, batch: dict, generator: torch.Generator, dropout: float) -> torch.Tensor:
        x0, x1 = batch["x0"], batch["x1"]
        x1_hat = self.predict_x1(x0, self.text_states(batch["caption"], dropout))
        if self.hparams.loss_type == "l2":
            return losses.l2_loss(x1_hat, x1)
        if self.hparams.loss_type == "pseudo_huber":
            return losses.pseudo_huber_loss(x1_hat, x1, self.hparams.huber_c)
        with torch.no_grad():  # the target needs no graph
            target = self.perceptual_images(x1)
        return self.perceptual(self.perceptual_images(x1_hat), target)
