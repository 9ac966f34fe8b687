"""Rectified-flow text-to-image sampling as a diffusers pipeline: 2-RF (few Euler steps) and InstaFlow (one step).

This file imports only torch, diffusers and transformers: the InstaFlow project copies it verbatim
into every exported folder as ``pipeline_rectified_flow.py``, and diffusers loads it from there:

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("path/to/export", trust_remote_code=True)
    image = pipe("a red circle", num_inference_steps=1, seeds=0).images[0]

The released InstaFlow / 2-RF weights (``XCLiu/instaflow_0_9B_from_sd_1_5``,
``XCLiu/2_rectified_flow_from_sd_1_5``: SD layout, CLIP text encoder) load through the same class,
e.g. ``RectifiedFlowPipeline.from_pretrained(folder)`` or ``DiffusionPipeline.from_pretrained(folder,
custom_pipeline="pipeline_rectified_flow.py", trust_remote_code=True)``; ``kind`` defaults to "flow".

Time convention: t = 0 is noise x0 ~ N(0, I), t = 1 is data x1, x_t = t x1 + (1 - t) x0, and the
velocity v = dx_t/dt is integrated by Euler from t = 0 to 1 with dt = 1/N. ``kind`` says how the
UNet gives v:
- "flow": a rectified-flow UNet, v = unet(x_t, 1000 (1 - t)) (the released models' convention);
- "ddpm_velocity": a DDPM UNet (epsilon or v prediction, the scheduler's schedule) converted
  analytically: x_s = x_t / sqrt(t^2 + (1 - t)^2) has the same SNR as ab = t^2 / (t^2 + (1 - t)^2),
  the UNet runs at that noise level's (continuous) DDPM timestep, and v = x1_hat - eps_hat; below the
  schedule's noisiest level t_min the UNet runs at t_min on x_t / sqrt(t^2 + (1 - t)^2) and
  v = (x1_hat - x_t) / (1 - t) (the velocity towards its x1 estimate from the actual x_t).
The conversion restates ``instaflow.flow`` (``diffusion``, ``noise``) on purpose (this file may not import the
project); tests/models/test_export.py pins the two equal.
"""

from __future__ import annotations

import inspect
import json
import shutil
import warnings
from pathlib import Path

import torch
import transformers
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, ImagePipelineOutput, ModelMixin
from diffusers.loaders import StableDiffusionLoraLoaderMixin

KINDS = ("flow", "ddpm_velocity")
PIPELINE_FILE = "pipeline_rectified_flow.py"  # the name this file has inside an exported folder


def seeded_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """x0 ~ N(0, I), one CPU generator per seed: the same seed gives the same noise on any machine."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float32)
                        for s in seeds])  # (B, *shape)


def alpha_bar_to_t(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Flow time of a DDPM noise level: t = sqrt(ab) / (sqrt(ab) + sqrt(1 - ab))."""
    s, n = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    return s / (s + n)


def ddpm_timestep(alpha_bar: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Continuous DDPM timestep of a noise level, interpolated in log-SNR over the training schedule."""
    log_snr = (alphas_cumprod / (1 - alphas_cumprod)).log().to(torch.float64)  # decreasing in the timestep
    q = (alpha_bar / (1 - alpha_bar)).log().to(torch.float64).clamp(log_snr[-1], log_snr[0])
    idx = torch.searchsorted(-log_snr, -q).clamp(1, len(log_snr) - 1)
    lo, hi = log_snr[idx - 1], log_snr[idx]
    return (idx - 1).to(torch.float64) + (lo - q) / (lo - hi)


def diffusion_to_x1_eps(output: torch.Tensor, x_s: torch.Tensor, alpha_bar: torch.Tensor,
                        prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x1_hat, eps_hat) from a DDPM output at x_s = sqrt(ab) x1 + sqrt(1 - ab) eps."""
    s = alpha_bar.sqrt().reshape(-1, *([1] * (x_s.ndim - 1)))
    n = (1 - alpha_bar).sqrt().reshape(-1, *([1] * (x_s.ndim - 1)))
    if prediction_type == "epsilon":
        eps = output
        x1 = (x_s - n * eps) / s
    elif prediction_type == "v_prediction":
        x1 = s * x_s - n * output
        eps = n * x_s + s * output
    elif prediction_type == "sample":
        x1 = output
        eps = (x_s - s * x1) / n
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    return x1, eps


class RectifiedFlowPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Text-to-image by Euler integration of a rectified flow (Liu et al. 2023, InstaFlow).

    ``pipe.load_lora_weights(folder)`` loads a LoRA student's adapter (diffusers' LoRA format, as the
    framework's ``lora/`` folders hold it) onto this pipeline's UNet: load the base model the
    adapter was trained on, with the same ``kind``, then the adapter.

    Args:
        kind: "flow" (UNet fed 1000 (1 - t); released InstaFlow / 2-RF) or "ddpm_velocity" (a DDPM
            UNet seen through the analytic epsilon/v -> velocity conversion; needs the scheduler).
        max_length: text padding length (default: the tokenizer's, at most 512).
        unet: a UNet2DConditionModel, or any model called like one (the stacked U-Net of InstaFlow-1.7B,
            a custom component in ``unet/stacked_unet.py``).
        text_encoder_2, tokenizer_2: given, the UNet is SDXL's and is conditioned as SDXL does (Podell et
            al. 2023): both encoders' penultimate states concatenated, the second one's pooled projection
            and the time ids (height, width, 0, 0, height, width) as ``added_cond_kwargs``; with
            ``force_zeros_for_empty_prompt`` the unconditional embeddings are zeros unless a
            ``negative_prompt`` is given.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["scheduler", "text_encoder_2", "tokenizer_2"]

    def __init__(self, vae: AutoencoderKL, text_encoder, tokenizer, unet: ModelMixin, scheduler=None,
                 kind: str = "flow", max_length: int | None = None, text_encoder_2=None, tokenizer_2=None,
                 force_zeros_for_empty_prompt: bool = True):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind == "ddpm_velocity" and scheduler is None:
            raise ValueError("kind 'ddpm_velocity' needs the DDPM scheduler of the model (its noise schedule)")
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        self.register_to_config(kind=kind, max_length=max_length,
                                force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)

    @property
    def is_xl(self) -> bool:
        """An SDXL-architecture UNet (a second text encoder): SDXL's conditioning (``encode_prompt_xl``)."""
        return getattr(self, "text_encoder_2", None) is not None

    # --- text ---------------------------------------------------------------------------------

    @property
    def max_length(self) -> int:
        return int(self.config.max_length or min(int(self.tokenizer.model_max_length), 512))

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Last hidden states (B, L, D), padded to ``max_length`` (SD's rule; also for BERT-like encoders)."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self._execution_device))[0]

    # --- velocity -----------------------------------------------------------------------------

    def _ddpm_schedule(self) -> tuple[torch.Tensor, str, float]:
        if not hasattr(self, "_schedule"):
            # the same alphas as diffusers' DDPMScheduler builds from this config, in float64
            sched = DDPMScheduler.from_config(self.scheduler.config)
            alphas = sched.alphas_cumprod.clone().to(torch.float64)
            # below the schedule's noisiest level the model knows nothing more: hold its boundary
            t_min = float(alpha_bar_to_t(alphas[-1]))
            self._schedule = (alphas, sched.config.prediction_type, t_min)
        return self._schedule

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """v(x_t, t | text) in flow time, (B, C, h, w) float32; ``t`` (B,)."""
        dtype = self.unet.dtype
        if self.config.kind == "flow":
            timestep = 1000.0 * (1.0 - t)  # the released models' timestep
            return self._unet_out(x_t.to(dtype), timestep.to(x_t.dtype), states)
        alphas, prediction_type, t_min = self._ddpm_schedule()
        t_true = t.to(torch.float64).clamp(0.0, 1 - 1e-6)
        t64 = t_true.clamp(min=t_min)  # the UNet's noisiest level is as far as it goes
        ab = t64**2 / (t64**2 + (1 - t64) ** 2)  # same SNR as x_t
        timestep = ddpm_timestep(ab, alphas.to(t64.device))  # (B,)
        scale = 1.0 / (t_true**2 + (1 - t_true) ** 2).sqrt()  # unit-variance noise (1 at t = 0)
        shape = (-1, *([1] * (x_t.ndim - 1)))
        x_s = x_t * scale.reshape(shape).to(x_t.dtype)
        out = self._unet_out(x_s.to(dtype), timestep.to(x_t.dtype), states)
        x1_hat, eps_hat = diffusion_to_x1_eps(out, x_s, ab.to(x_t.dtype), prediction_type)
        # below t_min: the velocity from the actual x_t to the UNet's x1 estimate
        below = (t_true < t_min).reshape(shape)
        return torch.where(below, (x1_hat - x_t) / (1 - t_true).reshape(shape).to(x_t.dtype), x1_hat - eps_hat)

    def _unet_out(self, x: torch.Tensor, timestep: torch.Tensor, states) -> torch.Tensor:
        """The UNet's output (float32) for text states, or SDXL's (states, pooled text, time ids)."""
        if isinstance(states, tuple):
            states, pooled, ids = states
            return self.unet(x, timestep, encoder_hidden_states=states,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample.float()
        return self.unet(x, timestep, encoder_hidden_states=states).sample.float()

    @staticmethod
    def _cat_cond(uncond, cond):
        if isinstance(cond, tuple):
            return tuple(torch.cat([u, c]) for u, c in zip(uncond, cond))
        return torch.cat([uncond, cond])

    def guided_velocity(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                        guidance_scale: float) -> torch.Tensor:
        """v_u + w (v_c - v_u) for every w != 1 (one batched pass); the conditional velocity alone at w = 1."""
        if uncond is None:
            return self.velocity(x, t, cond)
        v_u, v_c = self.velocity(torch.cat([x, x]), torch.cat([t, t]), self._cat_cond(uncond, cond)).chunk(2)
        return v_u + guidance_scale * (v_c - v_u)

    @torch.no_grad()
    def encode_prompt_xl(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(states (B, 77, D1 + D2), pooled (B, P)) as StableDiffusionXLPipeline.encode_prompt makes them."""
        states, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            out = encoder(ids.to(self._execution_device), output_hidden_states=True)
            if out[0].ndim == 2:  # the projection model's pooled text embedding
                pooled = out[0]
            states.append(out.hidden_states[-2])
        return torch.cat(states, dim=-1), pooled

    def _conditioning_xl(self, prompts, negative_prompt, guidance_scale, num_images_per_prompt, size):
        dtype, n = self.unet.dtype, len(prompts)
        ids = torch.tensor([[size[0], size[1], 0, 0, size[0], size[1]]], dtype=dtype,
                           device=self._execution_device).repeat(n, 1)
        states, pooled = self.encode_prompt_xl(prompts)
        cond = (states.to(dtype), pooled.to(dtype), ids)
        uncond = None
        if guidance_scale != 1.0:
            if negative_prompt is None and self.config.force_zeros_for_empty_prompt:
                uncond = (torch.zeros_like(cond[0]), torch.zeros_like(cond[1]), ids)
            else:
                neg = negative_prompt or ""
                neg = [neg] * n if isinstance(neg, str) else [q for q in neg for _ in range(num_images_per_prompt)]
                s_u, p_u = self.encode_prompt_xl(neg)
                uncond = (s_u.to(dtype), p_u.to(dtype), ids)
        return cond, uncond

    def _conditioning(self, prompts: list[str], negative_prompt, guidance_scale: float, num_images_per_prompt: int,
                      size: tuple[int, int]):
        """(cond, uncond) text states of the prompts; uncond (``negative_prompt``, default "") for every w != 1."""
        if self.is_xl:
            return self._conditioning_xl(prompts, negative_prompt, guidance_scale, num_images_per_prompt, size)
        dtype, n = self.unet.dtype, len(prompts)
        cond = self.encode_prompt(prompts).to(dtype)
        uncond = None
        if guidance_scale != 1.0:
            neg = negative_prompt if negative_prompt is not None else ""
            if isinstance(neg, str):  # one prompt: encoded once (as the project encodes "")
                uncond = self.encode_prompt([neg]).expand(n, -1, -1).to(dtype)
            else:
                uncond = self.encode_prompt([q for q in neg for _ in range(num_images_per_prompt)]).to(dtype)
        return cond, uncond

    # --- noise --------------------------------------------------------------------------------

    def prepare_noise(self, n: int, shape: tuple[int, int, int], num_images_per_prompt: int,
                      seeds: int | list[int] | None, generator) -> torch.Tensor:
        """x0 (n, C, h, w) in float32 on the CPU; from per-image seeds, diffusers generators, or the global RNG."""
        if seeds is not None and generator is not None:
            raise ValueError("give seeds or generator, not both")
        if seeds is not None:
            if isinstance(seeds, int):  # image j of every prompt from seed + j (the project's generate)
                seeds = [seeds + j for _ in range(n // num_images_per_prompt) for j in range(num_images_per_prompt)]
            if len(seeds) != n:
                raise ValueError(f"got {len(seeds)} seeds for {n} images (prompts x num_images_per_prompt)")
            return seeded_noise(seeds, shape)
        if isinstance(generator, list):
            if len(generator) != n:
                raise ValueError(f"got {len(generator)} generators for {n} images")
            return torch.stack([torch.randn(shape, generator=g, device=g.device, dtype=torch.float32).cpu()
                                for g in generator])
        if generator is not None:
            return torch.randn((n, *shape), generator=generator, device=generator.device, dtype=torch.float32).cpu()
        return torch.randn((n, *shape), dtype=torch.float32)

    # --- sampling -----------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 1, guidance_scale: float = 1.0,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1,
                 seeds: int | list[int] | None = None, generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, height: int | None = None, width: int | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        """Euler from t = 0 to 1 in ``num_inference_steps`` steps of dt = 1/N.

        Args:
            guidance_scale: w, finite and >= 0; with w != 1 v = v_u + w (v_c - v_u), the unconditional prompt being
                ``negative_prompt`` (default ""); with w <= 1 no unconditional pass runs (one-step InstaFlow).
            seeds: per-image noise seeds, one per image in prompt-major order; an int s gives image j
                of every prompt seed s + j. Same seed, same image as the InstaFlow project's ``generate``.
            generator: diffusers' alternative to ``seeds`` (one generator, or one per image).
            latents: the noise x0 itself, (N, C, h, w).
            output_type: "pil", "np" ((N, H, W, 3) in [0, 1]), "pt" ((N, 3, H, W) in [0, 1]) or "latent" (x1).
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be pil, np, pt or latent, got {output_type!r}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if not (float(guidance_scale) >= 0.0 and float(guidance_scale) != float("inf")):  # NaN fails ">="
            raise ValueError(f"guidance_scale must be a finite number >= 0 (1 = no guidance), got {guidance_scale!r}")
        if guidance_scale < 1.0:
            # diffusers pipelines and InstaFlow's own examples read w <= 1 as "no guidance" (w = 0 there is the
            # conditional model); here the formula holds for every w, so w = 0 is the unconditional model
            warnings.warn(f"guidance_scale {guidance_scale:g} < 1 interpolates towards the unconditional model "
                          "(v_u + w (v_c - v_u); 0 = unconditional): pass 1.0 for the conditional model alone",
                          stacklevel=2)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        n, device = len(prompts), self._execution_device

        # Noise x0 at t = 0.
        vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        h, w = (height // vae_scale if height else h), (width // vae_scale if width else w)
        shape = (int(self.unet.config.in_channels), h, w)
        x = (latents.float() if latents is not None else
             self.prepare_noise(n, shape, num_images_per_prompt, seeds, generator)).to(device)

        # Text states; the unconditional ones only when guidance is on.
        cond, uncond = self._conditioning(prompts, negative_prompt, guidance_scale, num_images_per_prompt,
                                          (h * vae_scale, w * vae_scale))

        # Euler steps on the uniform grid t_i = i / N.
        ts = torch.linspace(0.0, 1.0, num_inference_steps + 1, dtype=torch.float64)
        for t, t_next in self.progress_bar(list(zip(ts[:-1], ts[1:]))):
            dt = float(t_next - t)
            t_batch = torch.full((n,), float(t), device=device, dtype=torch.float32)
            x = x + dt * self.guided_velocity(x, t_batch, cond, uncond, guidance_scale)  # Euler step.

        if output_type == "latent":
            images = x
        else:
            images = self.vae.decode(x.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
            images = ((images.float() + 1) / 2).clamp(0, 1)  # (N, 3, H, W) in [0, 1]
            if output_type != "pt":
                images = images.permute(0, 2, 3, 1).cpu().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    # --- saving -------------------------------------------------------------------------------

    def save_pretrained(self, save_directory, **kwargs):
        """diffusers' save, plus this file beside the weights so that ``DiffusionPipeline`` can load the folder."""
        super().save_pretrained(save_directory, **kwargs)
        shutil.copyfile(Path(__file__), Path(save_directory) / PIPELINE_FILE)
        index_file = Path(save_directory) / "model_index.json"
        index = json.loads(index_file.read_text())
        index["_class_name"] = [Path(PIPELINE_FILE).stem, type(self).__name__]  # diffusers' custom-pipeline form
        library, name = index.get("tokenizer") or (None, None)
        if library == "transformers" and not name.endswith("Fast") and hasattr(transformers, name + "Fast"):
            # the folder holds tokenizer.json only, which transformers < 5 reads through the Fast class
            index["tokenizer"] = [library, name + "Fast"]
        for name, module in self.components.items():
            stem = Path(inspect.getfile(type(module))).stem if isinstance(module, torch.nn.Module) else None
            if stem and (Path(save_directory) / name / f"{stem}.py").exists():
                # a custom component that saved its own code (the stacked U-Net): name it by that file,
                # not by the module path it was imported under here
                index[name] = [stem, type(module).__name__]
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

