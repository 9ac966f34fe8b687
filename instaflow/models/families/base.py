"""What every model family shares (``instaflow.contracts.Family``): encode, then solve, then decode.

A family is one file of this package holding one ``FamilyBase`` subclass: it says how its prompts become
conditioning (``_encode``), how its network reads as a velocity field in our flow time (``_velocity``; t=0
noise, t=1 data), its time grid, how it decodes and saves, and which pipeline class names its folders
(``pipeline_class``, what ``families.load_family`` picks it by). Sampling is written here once: Euler / Heun
(``instaflow.flow.solvers``) over ``guided(velocity, cond, uncond, w)``, DPM-Solver++ for diffusion teachers.
"""

from __future__ import annotations

import abc
import contextlib
import json
from pathlib import Path
from typing import Callable, ClassVar

import torch

from instaflow.flow.guidance import drop_captions, guided
from instaflow.flow.noise import seeded_noise
from instaflow.flow.solvers import sample_diffusion_teacher, sample_euler, sample_heun, time_grid
from instaflow.models import loading
from instaflow.models.lora import DEFAULT_TARGETS

KINDS = ("ddpm", "flow", "ddpm_velocity", "flow_matching")
EULER_SOLVERS = {"euler": sample_euler, "heun": sample_heun}


def solvers_of(kind: str) -> tuple[str, ...]:
    """The solvers that fit ``kind``, the default first: DPM-Solver++ for diffusion teachers, Euler (and Heun)
    in flow time for rectified flows, Euler at the scheduler's sigmas for flow-matching models."""
    if kind not in KINDS:
        raise ValueError(f"kind must be 'ddpm', 'flow', 'ddpm_velocity' or 'flow_matching', got {kind!r}")
    return {"ddpm": ("dpm_solver++",), "flow_matching": ("euler",)}.get(kind, ("euler", "heun"))


def check_solver(kind: str, solver: str) -> str:
    """``solver``, or a ValueError naming the solvers that fit ``kind``."""
    valid = solvers_of(kind)
    if solver not in valid:
        raise ValueError(f"solver {solver!r} does not fit kind {kind!r}; choose one of {valid}")
    return solver


def absent_components(pretrained: str) -> dict:
    """Components a local folder's model_index.json lists as null (e.g. SD3 saved without T5), passed as None."""
    index = Path(loading.resolve_path(pretrained)) / "model_index.json"
    if not index.is_file():
        return {}
    return {k: None for k, v in json.loads(index.read_text()).items() if isinstance(v, list) and v[0] is None}


def saved_components(pretrained: str) -> dict:
    """What a folder this framework wrote says of itself (``instaflow_components.json``), else {}."""
    marker = Path(loading.resolve_path(pretrained)) / loading.COMPONENTS_FILE
    return json.loads(marker.read_text()) if marker.is_file() else {}


class FamilyBase(abc.ABC):
    """One model family as the stages see it (``instaflow.contracts.Family``); subclasses fill in the family.

    Class attributes a family sets: ``name`` (metadata word), ``title`` (for messages), ``pipeline_class`` (the
    diffusers pipeline its folders name in ``model_index.json``), ``conditioning`` (metadata words),
    ``options`` (loading options it takes besides ``kind``), ``lora_targets`` (default LoRA modules).
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    pipeline_class: ClassVar[str] = ""
    conditioning: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()
    ignores: ClassVar[tuple[str, ...]] = ("resolution",)  # loading options its own config fixes (given: ignored)
    lora_targets: ClassVar[tuple[str, ...]] = DEFAULT_TARGETS
    sample_batch_size: ClassVar[int] = 64
    bf16 = False  # bf16 autocast for text encoding, the denoiser and decoding; the ODE state stays fp32
    unet_bf16: bool | None = None  # the denoiser's own autocast setting where it differs (None: follow bf16)
    velocity_module: torch.nn.Module | None = None  # a student's velocity field, built once over its denoiser

    # -- loading -------------------------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def load(cls, pretrained: str, kind: str | None = None, **options) -> "FamilyBase":
        """The family model of folder / hub id ``pretrained`` read as ``kind`` (None: what the folder says)."""

    @classmethod
    @abc.abstractmethod
    def student_kind(cls, init: str, parameterization: str) -> str:
        """How a student trained from ``init`` with ``parameterization`` reads its network, or a ValueError."""

    @classmethod
    @abc.abstractmethod
    def load_student(cls, init: str, kind: str, wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                     **settings) -> "FamilyBase":
        """The family of ``init`` with a trainable denoiser (``wrap``: builds the student's network from it)."""

    @classmethod
    def for_student(cls, init: str, parameterization: str, stacked: bool = False,
                    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None, **settings) -> "FamilyBase":
        """The family of a student: kind from ``parameterization``, denoiser in train mode, velocity built once."""
        kind = cls.student_kind(init, parameterization)
        if stacked and not cls.stacks():
            raise NotImplementedError(f"{cls.title} students train their own {cls.denoiser_word()} "
                                      "(no stacked student)")
        family = cls.load_student(init, kind, wrap, **settings)
        family.denoiser.train()
        family.velocity_module = family._velocity()
        return family

    @classmethod
    def stacks(cls) -> bool:
        """Whether a two-network (stacked) student can be built from this family's denoiser."""
        return False

    @classmethod
    def denoiser_word(cls) -> str:
        return "transformer"

    # -- what it is ----------------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def kind(self) -> str: ...

    @property
    @abc.abstractmethod
    def denoiser(self) -> torch.nn.Module: ...

    scheduler_config: dict  # the family scheduler's config (a property or a field of each family)

    @property
    @abc.abstractmethod
    def latent_shape(self) -> tuple[int, int, int]: ...

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def solvers(self) -> tuple[str, ...]:
        return solvers_of(self.kind)

    @abc.abstractmethod
    def to(self, device: torch.device | str) -> "FamilyBase":
        """Move every network (denoiser, text encoders, VAE) to ``device``; returns self."""

    @abc.abstractmethod
    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        """The frozen networks (VAE, text encoders) by the attribute name a LightningModule registers them under."""

    def _autocast(self, enabled: bool | None = None):
        # off means "leave the caller's autocast alone" (a coupling stage's own), not "switch autocast off"
        on = self.bf16 if enabled is None else enabled
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()

    # -- text ----------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _encode(self, prompts: list[str], guidance: float) -> tuple:
        """(cond, uncond | None) by the family's own encoders; uncond only where guidance needs it."""

    @torch.no_grad()
    def encode(self, prompts: list[str], guidance: float) -> tuple:
        """(cond, uncond) conditioning of ``prompts`` (under bf16 autocast if set)."""
        with self._autocast():
            return self._encode(prompts, guidance)

    def encode_for_training(self, captions: list[str], dropout: float, generator: torch.Generator):
        """The conditioning a student trains on: captions dropped to "" with probability ``dropout``
        (``guidance.drop_captions``, the one caption dropout), then encoded (``_dropped_cond`` adjusts it)."""
        if dropout:
            captions = drop_captions(captions, dropout, generator)
        cond = self.encode(captions, 1.0)[0]
        return self._dropped_cond(cond, captions) if dropout else cond

    def _dropped_cond(self, cond, captions: list[str]):
        """The conditioning of a batch whose dropped captions are ""; a family whose unconditional
        embedding is not the empty prompt's (SDXL's zeros) replaces those rows."""
        return cond

    def check_stored_states(self) -> None:
        """Raise unless couplings may carry this family's text states (``store_text_states``)."""
        raise ValueError(f"store_text_states is not supported for the {self.name} family yet (its conditioning is "
                         "token states plus pooled embeddings); set it to false")

    def stored_states(self, states: torch.Tensor, dropout: float, generator: torch.Generator):
        """The conditioning of stored text states (the coupling stage's), caption dropout drawn as for captions."""
        raise ValueError(f"couplings with stored text states are not supported for the {self.name} family yet: "
                         "regenerate them with store_text_states: false")

    def check_sharding(self) -> None:
        """Raise unless the denoiser can be FSDP2-sharded by ``instaflow.models.sharding``."""
        raise NotImplementedError(f"FSDP2 sharding of {self.name} students is not implemented yet (the per-block "
                                  "sharding and the sharded export are written for SD UNets): train them with DDP "
                                  "(and LoRA where memory is short; python -m instaflow.tools.memory)")

    # -- the ODE -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _velocity(self) -> torch.nn.Module:
        """The denoiser as v(x_t, t, cond) in our flow time."""

    def velocity(self) -> torch.nn.Module:
        """The model as a velocity field v(x_t, t, cond) in flow time (a student's own, built once)."""
        return self.velocity_module if self.velocity_module is not None else self._velocity()

    def time_grid(self, steps: int) -> torch.Tensor:
        """0 -> 1 (float64): uniform, dt = 1/N (InstaFlow's sampling); flow-matching teachers override it."""
        return time_grid(steps)

    def solve(self, x0: torch.Tensor, cond, uncond, steps: int, guidance: float, solver: str | None = None,
              path: list | None = None) -> torch.Tensor:
        """x1 from x0: ``solver`` (default: the kind's first) along ``time_grid``, guidance v_u + w (v_c - v_u)
        for every w != 1 (``guidance.guided``); ``path`` receives (t, x_t) in flow time, x0 first."""
        solver = check_solver(self.kind, solver or self.solvers[0])
        if solver == "dpm_solver++":
            return self._solve_dpm(x0, cond, uncond, steps, guidance, path)
        return EULER_SOLVERS[solver](guided(self.velocity(), cond, uncond, guidance), x0, self.time_grid(steps), path)

    def _solve_dpm(self, x0, cond, uncond, steps: int, guidance: float, path: list | None) -> torch.Tensor:
        """DPM-Solver++(2M) over the diffusion teacher's schedule (Lu et al. 2022), on the same guided velocity
        field as Euler (the teacher through the conversion, ``instaflow.flow.velocity``)."""
        v_fn = guided(self.velocity(), cond, uncond, guidance)
        return sample_diffusion_teacher(v_fn, x0, self.scheduler_config, steps, path)

    @torch.no_grad()
    def sample_latents(self, prompts: list[str], steps: int, guidance: float, seeds: list[int] | None = None,
                       x0: torch.Tensor | None = None, states: tuple | None = None, path: list | None = None,
                       solver: str | None = None) -> torch.Tensor:
        """x1 latents (fp32) from seeded noise x0 (one seed per prompt): encode, then solve. ``states``:
        precomputed (cond, uncond), to time the denoiser alone; ``path`` receives the solver's (t, x_t)."""
        if x0 is None:
            x0 = seeded_noise(seeds, self.latent_shape)
        x0 = x0.to(self.device)
        cond, uncond = self.encode(prompts, guidance) if states is None else states
        with self._autocast(self.bf16 if self.unet_bf16 is None else self.unet_bf16):
            return self.solve(x0, cond, uncond, steps, guidance, solver, path).float()

    # -- images --------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images (B, 3, H, W) in [0, 1]."""

    @torch.no_grad()
    def sample_images(self, prompts: list[str], steps: int, guidance: float, seeds: list[int],
                      batch_size: int | None = None) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1], prompt i from noise seed ``seeds[i]``, in chunks of ``batch_size``."""
        n = batch_size or self.sample_batch_size
        return torch.cat([self.decode(self.sample_latents(prompts[i:i + n], steps, guidance, seeds[i:i + n]))
                          for i in range(0, len(prompts), n)])

    @torch.no_grad()
    def sample(self, prompts: list[str], steps: int = 25, guidance: float = 1.0, seed: int = 0,
               batch_size: int | None = None) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1]; prompt i uses noise seed ``seed + i``."""
        return self.sample_images(prompts, steps, guidance, list(range(seed, seed + len(prompts))), batch_size)

    # -- writing -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def save(self, dirpath: str | Path, denoiser: torch.nn.Module | None = None) -> Path:
        """Write the model (``denoiser`` in place of its own, e.g. a trained one) as the family's diffusers folder."""

    def write_lora_weights(self, out: Path, adapter: torch.nn.Module, metadata: dict) -> None:
        """The adapter in diffusers' LoRA format for this family's loader: a UNet LoRA (SD's, which SDXL reads)."""
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        from instaflow.models.lora import lora_state_dict

        StableDiffusionLoraLoaderMixin.save_lora_weights(out, unet_lora_layers=lora_state_dict(adapter),
                                                         safe_serialization=True, unet_lora_adapter_metadata=metadata)

    @classmethod
    def export_pipeline(cls, model: str, out: Path, prompt: str, unet_from: str | None = None,
                        shown: Path | None = None) -> Path:
        """Write ``model`` (a rectified flow of this family) as a folder plain diffusers loads (``models.export``)."""
        raise ValueError(f"'{model}' is a {cls.title} model saved as a plain diffusers {cls.pipeline_class} folder "
                         f"already: load it with {cls.pipeline_class}.from_pretrained (no export needed)")
