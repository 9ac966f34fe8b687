"""``FlowStudent``: what reflow and distillation share (stages 2 and 3 of InstaFlow).

Both train a copy of a model's UNet on stored couplings (x0, x1, caption); they differ only in
their ``loss`` (``reflow.py``, ``distill.py``). The math lives in ``instaflow.flow``; this module
orchestrates: hold the init's model family (``instaflow.contracts.Family``, whichever it is) from
``configure_model``, encode text, sample grids and quality images through it, export its pipeline folder.
"""

from __future__ import annotations

import abc
import copy
import inspect
from pathlib import Path

import lightning as L
import torch

from instaflow.flow.checks import checked_number
from instaflow.flow.guidance import check_guidance, check_probability
from instaflow.flow.losses import check_nonfinite_setting
from instaflow.flow.schedules import check_nonnegative, check_optimizer_settings
from instaflow.flow.solvers import check_steps
from instaflow.losses import Loss, ParamGroup, adamw_param_groups
from instaflow.contracts import Family
from instaflow.models import lora, sharding
from instaflow.models.families import load_student_family
from instaflow.models.unet import build_unet
from lightning_modules import training_rng
from lightning_modules.nonfinite import DEFAULT_LIMIT, NonfiniteGuard


def check_student_settings(h: dict) -> None:
    """Raise a ValueError naming the first bad setting of a student (when it is built, not hours into the run)."""
    check_optimizer_settings(h["lr"], h["warmup_steps"], h["weight_decay"])
    check_probability(h["caption_dropout"], "caption_dropout")
    for n in h["grid_steps"]:
        check_steps(n, "grid_steps")
    check_guidance(h["grid_guidance"], "grid_guidance")
    check_guidance(h["guidance_input"], "guidance_input")
    check_nonnegative(h["text_cache_mb"], "text_cache_mb")
    check_nonfinite_setting(h["nonfinite"], h["nonfinite_limit"])
    if h["lora_alpha"] is not None:
        checked_number(h["lora_alpha"], "lora_alpha", lambda v: v > 0, "a finite number > 0 (or null: alpha = rank)")


# the settings ``loss:`` replaced (issue 25): a config that still sets one is refused with the new spelling
REMOVED_LOSS_KEYS = {
    "loss_type": "loss: {class_path: instaflow.losses.L2} (loss_type l2), instaflow.losses.PseudoHuber "
                 "(pseudo_huber) or instaflow.losses.LPIPS (perceptual)",
    "huber_c": "loss: {class_path: instaflow.losses.PseudoHuber, init_args: {c: 0.03}}",
    "perceptual_features": "loss: {class_path: instaflow.losses.LPIPS, init_args: {features: lpips_vgg}}",
    "perceptual_decoder": "loss: {class_path: instaflow.losses.LPIPS, init_args: {decoder: madebyollin/taesd}}",
    "perceptual_size": "loss: {class_path: instaflow.losses.LPIPS, init_args: {size: 224}}",
}


def check_removed_loss_keys(**given) -> None:
    """Raise a ValueError naming a removed loss setting that is set, and what to write instead (docs/losses.md)."""
    for key, value in given.items():
        if value is not None:
            raise ValueError(f"model.init_args.{key} was removed: losses are objects now; instead of "
                             f"{key}: {value!r} write {REMOVED_LOSS_KEYS[key]} (see docs/losses.md)")


class FlowStudent(NonfiniteGuard, L.LightningModule, abc.ABC):
    """Shared plumbing of reflow and distillation: load the init model, encode text, sample, export.

    A subclass says what it regresses by implementing ``loss``; everything else is shared.

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
        lora_rank: train a LoRA adapter of this rank on the init's frozen UNet instead of the whole UNet
            (``instaflow.models.lora``); null trains every weight. Only the adapter is optimized and
            checkpointed; the export holds the merged model and the adapter alone in ``lora/``.
        lora_alpha: LoRA scale numerator (scale alpha / rank); null: alpha = rank.
        lora_target_modules: module names the adapter wraps (null: the family's ``lora_targets``, the attention
            projections).
        guidance_input: the guidance value fed as an input to guidance-distilled students (Flux dev) in
            training and sampling; set it to the guidance of the couplings they learn from.
        resolution: pixel size the student samples at, for families whose denoiser does not fix it
            (Flux; null: what the init folder says, else 1024).
        text_cache_mb: CPU memory (MB) for the text states of recent captions (SD 1.x/2.x and the embedded
            world; ``instaflow.models.text_encoder``): worth it when captions repeat (the embedded world's
            2000 prompts), 0 when they rarely do (LAION). SDXL, SD3 and Flux students encode every batch.
        nonfinite, nonfinite_limit: what a step with a non-finite loss or gradient does (skip and count, or
            stop; ``lightning_modules.nonfinite.NonfiniteGuard``).

    Every setting is checked when the module is built (a ValueError naming the key).
    """

    def __init__(self, init: str, parameterization: str = "raw", export_dir: str | None = None,
                 caption_dropout: float = 0.1,
                 lr: float = 1e-4, warmup_steps: int = 100, weight_decay: float = 0.0,
                 grid_steps: tuple[int, ...] = (1, 25), grid_guidance: float = 1.5, text_cache_mb: float = 256,
                 seed: int = 0, fsdp_mixed_precision: str | None = None,
                 activation_checkpointing: bool = False, lora_rank: int | None = None,
                 lora_alpha: float | None = None,
                 lora_target_modules: tuple[str, ...] | None = None,
                 guidance_input: float = 3.5, resolution: int | None = None, nonfinite: str = "skip",
                 nonfinite_limit: int = DEFAULT_LIMIT) -> None:
        super().__init__()
        if parameterization not in ("raw", "velocity_wrapper", "flow"):
            raise ValueError(f"parameterization must be raw, velocity_wrapper or flow, got {parameterization!r}")
        if lora_rank is not None and lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1 (or null for full training), got {lora_rank}")
        self.save_hyperparameters(ignore=["loss", *REMOVED_LOSS_KEYS])  # a subclass's loss: set_criterion
        check_student_settings(self.hparams)
        self.unet = None
        self.strict_loading = False  # checkpoints hold the trainable UNet only

    solver_tag = "euler"  # the quality curves' name for how this module samples (contracts.SamplesImages)

    @abc.abstractmethod
    def loss(self, batch: dict, generator: torch.Generator, dropout: float) -> torch.Tensor:
        """The training objective on a batch of couplings {x0, x1, caption}, t drawn from ``generator``,
        captions dropped with probability ``dropout``."""

    def configure_model(self) -> None:
        if self.unet is not None:
            return
        h = self.hparams
        # the init's family (instaflow.models.families), which checks the settings that depend on it
        self.family: Family = load_student_family(
            h.init, h.parameterization, stacked=h.get("student", "unet") != "unet", wrap=self.student_unet,
            text_cache_mb=h.text_cache_mb, resolution=h.resolution, guidance_input=h.guidance_input)
        for name, module in self.family.frozen_modules().items():
            setattr(self, name, module)  # registered, so the strategy moves them with the module
        self.unet = self.family.denoiser
        if h.lora_rank:
            lora.add_lora(self.unet, h.lora_rank, h.lora_alpha, self.lora_targets())
        self.velocity = self.family.velocity()  # over self.unet (the family's own denoiser object)
        # each data-parallel rank draws its own t and caption dropout (rank 0 = the single-device draws)
        self._gen = torch.Generator().manual_seed(h.seed + self.global_rank)
        if h.activation_checkpointing:
            self.unet.enable_gradient_checkpointing()
        mesh = getattr(self, "_device_mesh", None)  # set by ModelParallelStrategy before this hook
        if mesh is not None:
            self.family.check_sharding()
            if h.lora_rank:
                raise NotImplementedError("LoRA students under FSDP2 are not supported yet (the sharded export "
                                          "gathers a plain UNet): train LoRA on one device or with DDP")
            sharding.check_callbacks(self._trainer)
            sharding.shard_unet(self.unet, mesh, h.fsdp_mixed_precision)
        elif h.fsdp_mixed_precision is not None:
            raise ValueError("fsdp_mixed_precision needs trainer.strategy ModelParallelStrategy (FSDP2, see "
                             "experiments/sharding/fsdp2.yaml); on one device or DDP use trainer.precision: bf16-mixed")

    def lora_targets(self) -> tuple[str, ...]:
        """The modules the LoRA adapter wraps: ``lora_target_modules``, else the family's defaults."""
        return tuple(self.hparams.lora_target_modules or self.family.lora_targets)

    def student_unet(self, unet: torch.nn.Module) -> torch.nn.Module:
        """The trainable network built from the init's UNet (the UNet itself; DistillTraining may stack it)."""
        return unet

    @property
    def kind(self) -> str:
        """How the student's network reads as a velocity field (its family's rule for ``parameterization``)."""
        return self.family.kind

    def text_states(self, captions: list[str], dropout: float = 0.0):
        """The conditioning of ``captions``, each dropped to "" with probability ``dropout`` (the family's
        ``encode_for_training``: one caption dropout, drawn from the module's generator)."""
        return self.family.encode_for_training(captions, dropout, self._gen)

    def batch_states(self, batch: dict, dropout: float = 0.0):
        """The conditioning of a batch of couplings: the text states the coupling stage stored
        (``store_text_states``; no re-encoding) when the batch carries them, else the captions encoded.

        Caption dropout draws from the same generator either way, and a dropped caption gets the
        empty caption's states, so both paths train on the same conditioning (up to the stored
        states' float16 rounding).
        """
        if "text_states" not in batch:
            return self.text_states(batch["caption"], dropout)
        return self.family.stored_states(batch["text_states"], dropout, self._gen)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # a non-finite loss does not raise here (one rank raising alone would leave the others in a collective):
        # NonfiniteGuard.optimizer_step skips or stops the step on every rank alike
        loss = self.guard_loss(self.loss(batch, self._gen, self.hparams.caption_dropout))
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the global batch's loss on every strategy
        self.log("data/skipped", float(batch["skipped"]), reduce_fx="sum")
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        g = torch.Generator().manual_seed(1000 + batch_idx)  # same t every validation
        self.log("val/loss", self.loss(batch, g, 0.0), prog_bar=True)

    def sampler(self) -> Family:
        """The module's live networks as its family (the same denoiser object; Euler in flow time through
        ``self.velocity``, uniform steps dt = 1/N)."""
        return self.family

    @torch.no_grad()
    def sample_images(self, prompts: list[str], steps: int, guidance: float, seeds: list[int],
                      batch_size: int = 256) -> torch.Tensor:
        """Decoded samples (N, 3, H, W) in [0, 1], prompt i from noise seed ``seeds[i]``."""
        return self.sampler().sample_images(prompts, steps, guidance, seeds, batch_size)

    @torch.no_grad()
    def sample_grid(self, prompts: list[str], seed: int = 0) -> dict:
        seeds = list(range(seed, seed + len(prompts)))
        out = {}
        for n in self.hparams.grid_steps:
            w = self.hparams.grid_guidance if n > 1 else 1.0
            out[f"euler{n}_w{w:g}"] = self.sample_images(prompts, n, w, seeds, batch_size=len(prompts))
        return out

    def set_criterion(self, loss: Loss) -> None:
        """Called by a subclass's ``__init__``: save its hyperparameters and hold ``loss`` as ``self.criterion``.

        The hyperparameters record the loss's class path and settings (``Loss.description``), not the object:
        a checkpoint holds no pickled module (checkpoints are read weights-only).
        """
        if not isinstance(loss, Loss):
            raise TypeError(f"loss must be an instaflow.losses.Loss (e.g. class_path: instaflow.losses.L2), got "
                            f"{type(loss).__name__}")
        self.save_hyperparameters(ignore=["loss", *REMOVED_LOSS_KEYS], frame=inspect.currentframe().f_back)
        self.criterion = loss
        self.save_hyperparameters({"loss": loss.description()})

    def trained_networks(self) -> dict[str, torch.nn.Module]:
        """Every network the optimizer trains, by name (``contracts.TrainsNetworks``): the student first
        (``"unet"``: sampled, averaged by the EMA, exported), then the loss's own (``"loss.<name>"``)."""
        criterion = getattr(self, "criterion", None)
        extra = criterion.trained_networks() if criterion is not None else {}
        return {"unet": self.unet, **{f"loss.{k}": net for k, net in extra.items()}}

    def trained_prefixes(self) -> dict[str, str]:
        """{name: its key prefix in this module's state dict} of ``trained_networks`` (found by identity)."""
        where = {id(m): n for n, m in self.named_modules() if n}
        where[id(self.unet)] = "unet"  # the student's own attribute (another child may also reach it)
        nets = self.trained_networks()
        missing = [name for name, net in nets.items() if id(net) not in where]
        if missing:
            raise RuntimeError(f"trained networks {missing} are not submodules of {type(self).__name__}: a loss must "
                               "hold its networks as attributes (nn.Module children) so they are saved and moved")
        return {name: where[id(net)] + "." for name, net in nets.items()}

    def configure_criterion(self) -> None:
        """Build the loss's parts (once; ``Loss.configure``) and, under FSDP2, shard each network it trains
        as the student is sharded (``instaflow.models.sharding.shard_network``)."""
        criterion = getattr(self, "criterion", None)
        if criterion is None or getattr(self, "_criterion_configured", False):
            return
        criterion.configure(vae=getattr(self, "vae", None))
        mesh = getattr(self, "_device_mesh", None)
        if mesh is not None:
            for net in criterion.trained_networks().values():
                sharding.shard_network(net, mesh, self.hparams.fsdp_mixed_precision)
        self._criterion_configured = True

    def configure_optimizers(self):
        h = self.hparams
        # the trained networks only (VAE, text encoder and a loss's feature network are frozen): the student's
        # parameter group, then one per network the loss trains (its own lr, betas, weight decay, warm-up)
        student = ParamGroup("unet", [p for p in self.unet.parameters() if p.requires_grad], h.lr,
                             weight_decay=h.weight_decay, warmup_steps=h.warmup_steps)
        criterion = getattr(self, "criterion", None)
        return adamw_param_groups([student] + (criterion.param_groups() if criterion is not None else []))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)  # the non-finite guard's count
        checkpoint[training_rng.KEY] = training_rng.gathered_state(self, self._gen)  # every rank's draws
        if sharding.is_sharded(self.unet):
            # a distributed checkpoint is loaded into the whole module's state dict, which fails on any
            # missing key: keep the frozen parts (saved once, not per rank: they are replicated)
            return
        sd = checkpoint["state_dict"]
        # every trained network, nothing frozen: the student (under LoRA its adapter only: the base is the init's,
        # reloaded) and each network its loss trains (a frozen feature network is rebuilt by configure_model)
        prefixes = self.trained_prefixes()
        student = prefixes.pop("unet")
        adapter = lora.has_lora(self.unet)

        def keep(k: str) -> bool:
            if k.startswith(student):
                return "lora_" in k or not adapter
            return k.startswith(tuple(prefixes.values()))

        for k in [k for k in sd if not keep(k)]:
            del sd[k]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        training_rng.restore_state(self, self._gen, checkpoint)  # configure_model made it; this rank's saved draws

    def export_unet(self) -> torch.nn.Module | None:
        """The UNet with full weights for ``export``; under FSDP2 a gathered copy on rank 0 (None elsewhere).

        Collective under sharding: every rank must call it (``callbacks.export.Export`` does).
        """
        if not sharding.is_sharded(self.unet):
            return self.unet
        state = sharding.full_state_dict(self.unet)
        if self.global_rank != 0:
            return None
        unet = build_unet(dict(self.unet.config))
        unet.load_state_dict(state)
        return unet

    def trainable_names(self) -> list[str]:
        """Names of the trainable network's parameters, in the order the EMA callback keeps them."""
        return [n for n, p in self.unet.named_parameters() if p.requires_grad]

    def unet_from_state(self, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        """A whole copy of the trainable network holding ``state`` (e.g. a best checkpoint's EMA weights), for export.

        No second network on the device: the tensors ``state`` holds are taken from it (on its device, in the
        network's dtypes), the others (a LoRA student's frozen base) are the live network's own, shared.
        """
        if sharding.is_sharded(self.unet):
            unet = build_unet(dict(self.unet.config))
        else:
            def placeholder(t: torch.Tensor) -> torch.Tensor:  # no memory; load_state_dict(assign=True) fills it
                meta = torch.empty_like(t, device="meta")
                return torch.nn.Parameter(meta, t.requires_grad) if isinstance(t, torch.nn.Parameter) else meta

            own = {**dict(self.unet.named_parameters()), **dict(self.unet.named_buffers())}
            # deepcopy's memo maps each replaced tensor to a placeholder and each kept one to itself
            memo = {id(t): (placeholder(t) if name in state else t) for name, t in own.items()}
            unet = copy.deepcopy(self.unet, memo)
            state = {k: v.to(own[k].dtype) if k in own and v.is_floating_point() else v for k, v in state.items()}
        adapter = lora.has_lora(unet)  # a LoRA checkpoint holds the adapter only: the base stays the init's
        missing, unexpected = unet.load_state_dict(state, strict=not adapter, assign=True)
        if unexpected or (adapter and any("lora_" in k for k in missing)):
            raise KeyError(f"the state does not fit the network: unexpected {unexpected[:3]}, missing "
                           f"{[k for k in missing if 'lora_' in k][:3]}")
        return unet

    def export(self, dirpath: str, unet: torch.nn.Module | None = None) -> Path:
        """Write the trained network (``unet``: a gathered or EMA copy, else the live one) as the family's
        diffusers folder; a LoRA student's merged weights, and the adapter alone in ``lora/``."""
        if unet is None:
            if sharding.is_sharded(self.unet):
                raise RuntimeError("the UNet is FSDP2-sharded: gather it first on every rank with export_unet() "
                                   "and pass it as export(dirpath, unet=...) on rank 0 (the Export callback does)")
            unet = self.unet
        adapter = unet if lora.has_lora(unet) else None
        out = self.family.save(dirpath, lora.merged(adapter) if adapter is not None else unet)  # later stages
        if adapter is not None:  # read an ordinary model folder
            h = self.hparams
            lora.save_lora(adapter, out, h.init, h.lora_rank, h.lora_alpha, self.lora_targets(), family=self.family)
        return out
