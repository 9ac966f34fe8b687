"""Model families beyond SD 1.x/2.x, each seen as: prompts -> ``Conditioning``; a velocity field in our
flow time; latents -> images. Written: SDXL (a diffusion teacher; its students are trained
through the velocity conversion), SD3 / SD3.5 and Flux (flow-matching teachers; Flux with packed
latents and a guidance input); each family's students train and export.

The family's own diffusers pipeline is loaded (hub id or local folder, through ``loading.from_pretrained``,
so a missing model fails at once naming it and the local-folder fix) and its own ``encode_prompt`` makes
the conditioning, so prompts are encoded exactly as the family does it (CLIP-L + CLIP-G token states
concatenated and padded to T5's width, then T5's; pooled = both CLIP projections). Sampling is ours:
Euler in flow time along the family scheduler's own (shifted) sigmas (``instaflow.flow.flow_matching``),
which equals the pipeline's loop; ``tests/models/test_families.py`` pins it to the pipeline.

``SD3Model`` has the attributes the coupling stage uses of ``TextToImage`` (``kind``, ``latent_shape``,
``unet`` (the transformer), ``scheduler_config``, ``encode``, ``velocity``, ``time_grid``,
``sample_latents``, ``decode``), so ``CouplingGeneration`` solves its ODE unchanged.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from instaflow.flow.conditioning import Conditioning
from instaflow.flow.flow_matching import FlowMatchingVelocity, flow_matching_time_grid, fm_timestep, fm_to_velocity
from instaflow.flow.guidance import guided, uses_uncond
from instaflow.flow.noise import seeded_noise
from instaflow.flow.solvers import sample_dpm_solver, sample_euler, time_grid
from instaflow.models import loading

FAMILY_PIPELINES = {"StableDiffusion3Pipeline": "sd3", "StableDiffusionXLPipeline": "sdxl", "FluxPipeline": "flux"}


def family_of(pretrained: str) -> str:
    """"sd3" / "sdxl" for a folder whose model_index.json names that pipeline, else "sd" (SD 1.x/2.x, the embedded SD)."""
    index = Path(loading.resolve_path(pretrained)) / "model_index.json"
    if not index.is_file():
        return "sd"
    return FAMILY_PIPELINES.get(json.loads(index.read_text()).get("_class_name"), "sd")


def _absent_components(pretrained: str) -> dict:
    """Components a local folder's model_index.json lists as null (e.g. SD3 saved without T5), passed as None."""
    index = Path(loading.resolve_path(pretrained)) / "model_index.json"
    if not index.is_file():
        return {}
    return {k: None for k, v in json.loads(index.read_text()).items() if isinstance(v, list) and v[0] is None}


class _FamilyPipeline:
    """What every family adapter shares: the denoiser under the name the stages use (``unet``), the
    scheduler config, the device, VAE decoding (scale, and shift where the family has one) and chunked
    sampling to images. ``_denoiser``: the pipeline attribute holding the trained network."""

    _denoiser = "transformer"
    bf16 = False  # bf16 autocast for text encoding, the denoiser and decoding, as TextToImage; ODE state fp32

    @property
    def unet(self) -> torch.nn.Module:
        return getattr(self.pipe, self._denoiser)

    def to(self, device: torch.device | str) -> "_FamilyPipeline":
        """Move the whole pipeline (denoiser, text encoders, VAE) to ``device``; returns self."""
        self.pipe.to(device)
        return self

    def _autocast(self):
        # off means "leave the caller's autocast alone" (a coupling stage's own), not "switch autocast off"
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    @torch.no_grad()
    def encode(self, prompts: list[str], guidance: float) -> tuple[Conditioning, Conditioning | None]:
        """(cond, uncond) conditioning of ``prompts`` by the family's own encoders (under bf16 autocast if set)."""
        with self._autocast():
            return self._encode(prompts, guidance)

    @torch.no_grad()
    def sample_latents(self, prompts: list[str], steps: int, guidance: float, seeds: list[int] | None = None,
                       x0: torch.Tensor | None = None, path: list | None = None) -> torch.Tensor:
        """x1 latents (fp32) from seeded noise x0 (one seed per prompt) by the family's solver; ``path`` (optional)
        receives the solver's states (t, x_t) in flow time. The ODE state stays fp32 under bf16 autocast."""
        x0 = (seeded_noise(seeds, self.latent_shape) if x0 is None else x0).to(self.device)
        cond, uncond = self.encode(prompts, guidance)
        with self._autocast():
            return self._solve(x0, cond, uncond, steps, guidance, path).float()

    def _solve(self, x0, cond, uncond, steps: int, guidance: float, path: list | None) -> torch.Tensor:
        """Euler in flow time along ``time_grid`` with the guidance rule of ``instaflow.flow.guidance.guided``."""
        return sample_euler(guided(self.velocity(), cond, uncond, guidance), x0, self.time_grid(steps), path)

    @property
    def scheduler_config(self) -> dict:
        return dict(self.pipe.scheduler.config)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images (B, 3, H, W) in [0, 1], undoing the VAE's scaling (and shift) as the pipeline does."""
        vae = self.pipe.vae
        z = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        with self._autocast():
            return ((vae.decode(z.to(vae.dtype)).sample.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def sample_images(self, prompts: list[str], steps: int, guidance: float, seeds: list[int],
                      batch_size: int = 64) -> torch.Tensor:
        return torch.cat([self.decode(self.sample_latents(prompts[i:i + batch_size], steps, guidance,
                                                          seeds[i:i + batch_size]))
                          for i in range(0, len(prompts), batch_size)])


class SD3Model(_FamilyPipeline):
    """An SD3 / SD3.5 pipeline as a flow-matching teacher in our time (no weights change: it is already a flow)."""

    kind = "flow_matching"
    family = "sd3"
    conditioning = "CLIP-L + CLIP-G + T5 token states, CLIP pooled projections (encode_prompt)"

    def __init__(self, pipe, max_sequence_length: int = 256, uniform: bool = False) -> None:
        self.pipe, self.max_sequence_length = pipe, max_sequence_length
        self.uniform = uniform  # True: Euler with dt = 1/N (our rectified flows); False: the scheduler's sigmas

    @classmethod
    def from_pretrained(cls, pretrained: str, uniform: bool | None = None, **kw) -> "SD3Model":
        """Load an SD3 folder or hub id; ``uniform`` defaults to what a folder this framework wrote says."""
        from diffusers import StableDiffusion3Pipeline

        pipe = loading.from_pretrained(StableDiffusion3Pipeline, pretrained, what="SD3 pipeline",
                                       **_absent_components(pretrained))
        pipe.set_progress_bar_config(disable=True)
        if uniform is None:
            marker = Path(loading.resolve_path(pretrained)) / loading.COMPONENTS_FILE
            uniform = marker.is_file() and json.loads(marker.read_text()).get("sampling") == "uniform"
        return cls(pipe, uniform=uniform, **kw)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.pipe.transformer.config
        return (c.in_channels, c.sample_size, c.sample_size)  # (16, 128, 128) for 1024 px

    def _encode(self, prompts: list[str], guidance: float) -> tuple[Conditioning, Conditioning | None]:
        """(cond, uncond) by the pipeline's own ``encode_prompt``; uncond (empty prompt) only under guidance (w != 1)."""
        cfg = uses_uncond(guidance)
        pe, npe, ppe, nppe = self.pipe.encode_prompt(prompts, prompts, prompts, device=self.device,
                                                     do_classifier_free_guidance=cfg,
                                                     max_sequence_length=self.max_sequence_length)
        return Conditioning(pe, ppe), (Conditioning(npe, nppe) if cfg else None)

    def velocity(self) -> torch.nn.Module:
        return FlowMatchingVelocity(self.pipe.transformer)

    def time_grid(self, steps: int) -> torch.Tensor:
        """0 -> 1: uniform (dt = 1/N) for our rectified flows, else at the family scheduler's (shifted) sigmas."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if self.uniform:
            return time_grid(steps)
        return flow_matching_time_grid(FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config), steps)

    def save_flow(self, dirpath: str | Path, transformer: torch.nn.Module | None = None) -> Path:
        """Write a trained SD3 rectified flow as an SD3 pipeline folder that plain diffusers loads.

        It is still a flow-matching model (the transformer predicts noise - data at timestep sigma * 1000),
        so ``StableDiffusion3Pipeline`` samples it; the scheduler is saved with ``shift`` 1 so that
        ``pipe(..., sigmas=[1 - i / N for i in range(N)])`` takes our uniform Euler steps (dt = 1/N).
        """
        from diffusers import FlowMatchEulerDiscreteScheduler

        out = Path(dirpath)
        scheduler, own = self.pipe.scheduler, self.pipe.transformer
        try:
            self.pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, shift=1.0)
            if transformer is not None:
                self.pipe.transformer = transformer
            self.pipe.save_pretrained(out)
        finally:
            self.pipe.scheduler, self.pipe.transformer = scheduler, own
        (out / loading.COMPONENTS_FILE).write_text(json.dumps(
            {"kind": "flow_matching", "family": "sd3", "sampling": "uniform",
             "diffusers": "StableDiffusion3Pipeline.from_pretrained(dir)(prompt, num_inference_steps=N, "
                          "sigmas=[1 - i / N for i in range(N)])"}, indent=2))
        return out


class SDXLModel(_FamilyPipeline):
    """An SDXL pipeline as a diffusion teacher (epsilon prediction): DPM-Solver++ with its conditioning.

    The conditioning is the pipeline's own: ``encode_prompt`` (both CLIP encoders' penultimate states
    concatenated, the second one's pooled projection; with ``force_zeros_for_empty_prompt`` the
    unconditional embeddings are zeros, not the empty prompt's) and ``_get_add_time_ids`` (original
    size = target size = the output size, crop (0, 0), as the pipeline defaults), carried in a
    ``Conditioning`` that ``call_unet`` passes as ``added_cond_kwargs``. ``vae``: another VAE to decode
    with (e.g. a local copy of the community's fp16-fixed SDXL VAE, ``madebyollin/sdxl-vae-fp16-fix``).
    """

    family = "sdxl"
    _denoiser = "unet"
    conditioning = "CLIP-L + CLIP-G penultimate states, CLIP-G pooled projection, time ids; zeros as uncond"

    def __init__(self, pipe, velocity_kind: str | None = None) -> None:
        self.pipe = pipe
        # None: the diffusion teacher (DPM-Solver++); "ddpm_velocity" / "flow": a rectified flow trained
        # from it (Euler with dt = 1/N through instaflow.flow.velocity), as this framework's students save
        self.velocity_kind = velocity_kind

    @property
    def kind(self) -> str:
        return self.velocity_kind or "ddpm"

    @classmethod
    def from_pretrained(cls, pretrained: str, vae: str | None = None, velocity_kind: str | None = None) -> "SDXLModel":
        from diffusers import AutoencoderKL, StableDiffusionXLPipeline

        extra = _absent_components(pretrained)
        if vae is not None:
            extra["vae"] = loading.from_pretrained(AutoencoderKL, vae, what="SDXL VAE")
        pipe = loading.from_pretrained(StableDiffusionXLPipeline, pretrained, what="SDXL pipeline", **extra)
        pipe.set_progress_bar_config(disable=True)
        if velocity_kind is None:
            marker = Path(loading.resolve_path(pretrained)) / loading.COMPONENTS_FILE
            velocity_kind = json.loads(marker.read_text()).get("kind") if marker.is_file() else None
        return cls(pipe, velocity_kind=velocity_kind)

    def velocity(self) -> torch.nn.Module:
        """A student's velocity field in flow time (only for rectified flows, ``velocity_kind`` set)."""
        from instaflow.flow.velocity import velocity_field

        return velocity_field(self.pipe.unet, self.velocity_kind, self.scheduler_config)

    def time_grid(self, steps: int) -> torch.Tensor:
        return time_grid(steps)

    def save_flow(self, dirpath: str | Path, unet: torch.nn.Module | None = None) -> Path:
        """Write an SDXL rectified flow as an SDXL pipeline folder plus ``instaflow_components.json`` (its kind);
        ``instaflow.models.export`` turns it into a ``RectifiedFlowPipeline`` folder (SDXL conditioning) for plain diffusers."""
        out = Path(dirpath)
        own = self.pipe.unet
        try:
            if unet is not None:
                self.pipe.unet = unet
            self.pipe.save_pretrained(out)
        finally:
            self.pipe.unet = own
        (out / loading.COMPONENTS_FILE).write_text(json.dumps({"kind": self.velocity_kind, "family": "sdxl"},
                                                              indent=2))
        return out

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.pipe.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)  # (4, 128, 128) for 1024 px

    def _encode(self, prompts: list[str], guidance: float) -> tuple[Conditioning, Conditioning | None]:
        cfg = uses_uncond(guidance)
        pe, npe, ppe, nppe = self.pipe.encode_prompt(prompts, device=self.device, do_classifier_free_guidance=cfg)
        size = self.latent_shape[1] * self.pipe.vae_scale_factor
        proj = (self.pipe.text_encoder_2.config.projection_dim if self.pipe.text_encoder_2 is not None
                else int(ppe.shape[-1]))
        ids = self.pipe._get_add_time_ids((size, size), (0, 0), (size, size), dtype=pe.dtype,
                                          text_encoder_projection_dim=proj).to(self.device).repeat(len(prompts), 1)
        return Conditioning(pe, ppe, ids), (Conditioning(npe, nppe, ids) if cfg else None)

    def _solve(self, x0, cond, uncond, steps: int, guidance: float, path: list | None) -> torch.Tensor:
        if self.velocity_kind is not None:  # a rectified flow: Euler in flow time, dt = 1/N
            return super()._solve(x0, cond, uncond, steps, guidance, path)
        return sample_dpm_solver(self.pipe.unet, self.scheduler_config, x0, cond, uncond, guidance, steps, path=path)

def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> Flux's 2x2 patches (B, h/2 * w/2, 4C), as ``FluxPipeline._pack_latents``."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Flux's patches (B, h/2 * w/2, 4C) -> (B, C, h, w), as ``FluxPipeline._unpack_latents``."""
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


class FluxVelocity(torch.nn.Module):
    """A Flux transformer as v(x_t, t, cond) on unpacked latents (B, C, h, w) in our time.

    Flux is a flow-matching model fed sigma itself (its pipeline passes timestep / 1000): packed x_t,
    timestep 1 - t, the guidance input of guidance-distilled checkpoints (``cond.guidance``), zero text
    ids and (row, column) image ids as the pipeline makes them; v = -unpack(output) (``flow_matching``).
    """

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        b, _, h, w = x_t.shape
        img_ids = torch.zeros(h // 2, w // 2, 3)
        img_ids[..., 1] += torch.arange(h // 2)[:, None]
        img_ids[..., 2] += torch.arange(w // 2)[None, :]
        txt_ids = torch.zeros(cond.states.shape[1], 3)
        out = self.transformer(hidden_states=pack_latents(x_t), timestep=fm_timestep(t, 1.0).to(x_t.dtype),
                               guidance=cond.guidance, pooled_projections=cond.pooled,
                               encoder_hidden_states=cond.states, txt_ids=txt_ids.to(x_t),
                               img_ids=img_ids.reshape(-1, 3).to(x_t), return_dict=False)[0]
        return fm_to_velocity(unpack_latents(out, h, w))


class FluxModel(_FamilyPipeline):
    """A FLUX.1 pipeline as a flow-matching teacher in our time: its ``encode_prompt`` (T5 states, CLIP
    pooled), Euler at its scheduler's sigmas (linspace(1, 1/N, N) shifted by mu from the image's token
    count, as ``FluxPipeline``), guidance as an input when the checkpoint is guidance-distilled (dev),
    latents unpacked (B, 16, h, w) between steps. ``resolution``: the pixel size it samples."""

    kind = "flow_matching"
    family = "flux"
    conditioning = "T5 token states, CLIP pooled output, guidance as an input (no unconditional pass)"

    def __init__(self, pipe, resolution: int = 1024, max_sequence_length: int = 512, uniform: bool = False,
                 guidance_input: float | None = None) -> None:
        self.pipe, self.resolution, self.max_sequence_length = pipe, resolution, max_sequence_length
        self.uniform = uniform  # True: Euler with dt = 1/N (our rectified flows); False: the pipeline's sigmas
        self.guidance_input = guidance_input  # a student's fixed guidance input (it was trained at that value)

    @classmethod
    def from_pretrained(cls, pretrained: str, resolution: int | None = None, uniform: bool | None = None,
                        **kw) -> "FluxModel":
        """Load a Flux folder or hub id; a folder this framework wrote also fixes resolution, uniform steps
        and the guidance input it was trained at."""
        from diffusers import FluxPipeline

        pipe = loading.from_pretrained(FluxPipeline, pretrained, what="Flux pipeline", **_absent_components(pretrained))
        pipe.set_progress_bar_config(disable=True)
        marker = Path(loading.resolve_path(pretrained)) / loading.COMPONENTS_FILE
        saved = json.loads(marker.read_text()) if marker.is_file() else {}
        kw.setdefault("guidance_input", saved.get("guidance_input"))
        return cls(pipe, resolution=resolution or saved.get("resolution", 1024),
                   uniform=saved.get("sampling") == "uniform" if uniform is None else uniform, **kw)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        h = 2 * (self.resolution // (self.pipe.vae_scale_factor * 2))
        return (self.pipe.transformer.config.in_channels // 4, h, h)  # (16, 128, 128) at 1024 px

    def _encode(self, prompts: list[str], guidance: float) -> tuple[Conditioning, None]:
        """(cond, None): a guidance-distilled Flux takes w as an input; there is no unconditional pass."""
        pe, ppe, _ = self.pipe.encode_prompt(prompts, prompts, device=self.device,
                                             max_sequence_length=self.max_sequence_length)
        w = self.guidance_input if self.guidance_input is not None else guidance
        g = (torch.full((len(prompts),), float(w), device=self.device)
             if self.pipe.transformer.config.guidance_embeds else None)
        return Conditioning(pe, ppe, guidance=g), None

    def velocity(self) -> torch.nn.Module:
        return FluxVelocity(self.pipe.transformer)

    def time_grid(self, steps: int) -> torch.Tensor:
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        if self.uniform:
            return time_grid(steps)
        c = self.scheduler_config
        _, h, w = self.latent_shape
        mu = calculate_shift((h // 2) * (w // 2), c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        sched = FlowMatchEulerDiscreteScheduler.from_config(c)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        return 1.0 - sched.sigmas.to(torch.float64)

    def save_flow(self, dirpath: str | Path, transformer: torch.nn.Module | None = None) -> Path:
        """Write a trained Flux rectified flow as a Flux pipeline folder that plain diffusers samples as we do.

        The scheduler is saved without dynamic shifting and with shift 1, so ``FluxPipeline``'s own default
        sigmas (linspace(1, 1/N, N), then 0) are our uniform Euler steps; call it with
        ``guidance_scale`` = the guidance input the student was trained at (``instaflow_components.json``).
        """
        from diffusers import FlowMatchEulerDiscreteScheduler

        out = Path(dirpath)
        scheduler, own = self.pipe.scheduler, self.pipe.transformer
        try:
            self.pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
                scheduler.config, use_dynamic_shifting=False, shift=1.0)
            if transformer is not None:
                self.pipe.transformer = transformer
            self.pipe.save_pretrained(out)
        finally:
            self.pipe.scheduler, self.pipe.transformer = scheduler, own
        (out / loading.COMPONENTS_FILE).write_text(json.dumps(
            {"kind": "flow_matching", "family": "flux", "sampling": "uniform", "resolution": self.resolution,
             "guidance_input": self.guidance_input,
             "diffusers": "FluxPipeline.from_pretrained(dir)(prompt, num_inference_steps=N, "
                          "guidance_scale=guidance_input, height=resolution, width=resolution)"}, indent=2))
        return out


def load_teacher(pretrained: str, kind: str | None = None, resolution: int | None = None, vae: str | None = None):
    """The model a coupling stage solves: ``SD3Model`` / ``SDXLModel`` / ``FluxModel`` for those folders, else a
    ``TextToImage``; ``vae`` (SDXL only) decodes with another VAE."""
    if vae is not None and family_of(pretrained) != "sdxl":
        raise ValueError(f"vae={vae!r} is an option of SDXL teachers; '{pretrained}' is not an SDXL pipeline folder")
    if family_of(pretrained) == "sdxl":
        if kind not in (None, "ddpm", "ddpm_velocity", "flow"):
            raise ValueError(f"'{pretrained}' is an SDXL pipeline: kind must be null, ddpm (the diffusion teacher), "
                             f"ddpm_velocity or flow (a rectified flow trained from it), got {kind!r}")
        model = SDXLModel.from_pretrained(pretrained, vae=vae)  # kind from the folder (a framework export says)
        if kind is not None:
            model.velocity_kind = None if kind == "ddpm" else kind
        return model
    if family_of(pretrained) == "flux":
        if kind not in (None, "flow_matching"):
            raise ValueError(f"'{pretrained}' is a Flux pipeline (a flow-matching model): kind must be null or "
                             f"flow_matching, got {kind!r}")
        return FluxModel.from_pretrained(pretrained, resolution=resolution)
    if family_of(pretrained) == "sd3":
        if kind not in (None, "flow_matching"):
            raise ValueError(f"'{pretrained}' is an SD3 pipeline (a flow-matching model): kind must be null or "
                             f"flow_matching, got {kind!r}")
        return SD3Model.from_pretrained(pretrained)
    from instaflow.models.sampler import TextToImage

    return TextToImage.from_pretrained(pretrained, kind=kind)
