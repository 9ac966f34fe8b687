"""What callbacks need from a LightningModule, and what the sharding guard needs from a callback.

Written down as ``typing.Protocol``s (structural: a module satisfies one by having the methods,
no inheritance needed), so a callback checks ``isinstance(pl_module, SamplesImages)`` and fails
with a message that names the contract, instead of probing with ``hasattr``/``getattr``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class SamplesImages(Protocol):
    """Samples images for scoring: prompt i from noise seed ``seeds[i]``; ``solver_tag`` names the solver
    in metric names (e.g. "euler", "dpm")."""

    solver_tag: str

    def sample_images(self, prompts: list[str], steps: int, guidance: float, seeds: list[int],
                      batch_size: int = 256) -> torch.Tensor:  # (N, 3, H, W) in [0, 1]
        ...


@runtime_checkable
class SamplesPaths(Protocol):
    """Gives its sampler for path metrics: ``sampler().sample_latents(prompts, steps, guidance, seeds, path=[])``
    appends the solver's states [(t, x_t), ...] in flow time, x0 first (the quality callback's straightness)."""

    def sampler(self):
        ...


@runtime_checkable
class SamplesGrid(Protocol):
    """Draws named image grids of fixed prompts and seeds: ``{name: (N, 3, H, W) in [0, 1]}``."""

    def sample_grid(self, prompts: list[str], seed: int = 0) -> dict[str, torch.Tensor]:
        ...


@runtime_checkable
class Exportable(Protocol):
    """Writes what it trained as a folder and returns its path."""

    def export(self, dirpath: str) -> Path:
        ...


@runtime_checkable
class GathersForExport(Protocol):
    """An ``Exportable`` whose trained network may be sharded: ``export_unet()`` is a collective (every rank
    calls it) returning the whole network on rank 0, which is then passed as ``export(dirpath, unet=...)``."""

    def export_unet(self) -> torch.nn.Module | None:
        ...

    def export(self, dirpath: str, unet: torch.nn.Module | None = None) -> Path:
        ...


@runtime_checkable
class ExportsFromState(Protocol):
    """A ``GathersForExport`` that rebuilds its whole trained network from a state dict (a best checkpoint's, EMA
    weights included: ``trainable_names()`` orders them) for ``export(dirpath, unet=...)``."""

    def trainable_names(self) -> list[str]:
        ...

    def unet_from_state(self, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        ...


@runtime_checkable
class DescribesCouplings(Protocol):
    """A coupling generator: ``metadata()`` is written beside its shards; ``decode(x1)`` draws x1 for the grid."""

    def metadata(self) -> dict:
        ...

    def decode(self, x1: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) in [0, 1]
        ...


@runtime_checkable
class TrainsNetworks(Protocol):
    """Names every network a module's optimizer trains: ``{name: module}``, the student first (what is sampled,
    averaged by the EMA and exported), then any a loss trains (``"loss.<name>"``: a discriminator, a fake-score
    model). Checkpoints keep each of them, FSDP2 shards each, and callbacks find the student here instead of by
    an attribute name."""

    def trained_networks(self) -> dict[str, torch.nn.Module]:
        ...


def student_network(module) -> torch.nn.Module:
    """The first of ``module.trained_networks()`` (``TrainsNetworks``): the network that is sampled and exported."""
    networks = module.trained_networks()
    if not networks:
        raise ValueError(f"{type(module).__name__}.trained_networks() is empty: it names no network to train")
    return next(iter(networks.values()))


@runtime_checkable
class ShardingAware(Protocol):
    """A callback that says whether it can run beside an FSDP2-sharded module.

    Under FSDP2 every rank must take part in each forward (parameter all-gathers); a callback that
    runs the model on one rank alone would hang the run, and answers False.
    """

    def supports_sharded_module(self) -> bool:
        ...


@runtime_checkable
class Family(Protocol):
    """A model family (SD 1.x/2.x, SDXL, SD3, Flux, ...) seen the one way the stages use it.

    ``instaflow.models.families`` holds one implementation per family (``families/base.py``: what they share);
    ``load_family(folder)`` picks it by the folder's ``model_index.json``. Stages hold one and never ask which it is:
    prompts -> conditioning (``encode``, unconditional included), a velocity field v(x_t, t, cond) in our flow time
    (t=0 noise, t=1 data), ``solve`` along the family's time grid, ``decode``, the trainable ``denoiser`` and the
    frozen modules a LightningModule registers, ``save`` as the family's own diffusers folder, LoRA defaults.
    ``name`` and ``conditioning`` are words for metadata only (never branched on by a stage).
    """

    name: str
    conditioning: str
    lora_targets: tuple[str, ...]
    bf16: bool

    @property
    def kind(self) -> str:  # "ddpm" | "flow" | "ddpm_velocity" | "flow_matching": how its network is read
        ...

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        ...

    @property
    def device(self) -> torch.device:
        ...

    @property
    def denoiser(self) -> torch.nn.Module:  # the trainable network (UNet or transformer)
        ...

    @property
    def solvers(self) -> tuple[str, ...]:  # the solvers that fit ``kind``, the default first
        ...

    def to(self, device: torch.device | str) -> "Family":
        ...

    def encode(self, prompts: list[str], guidance: float) -> tuple:  # (cond, uncond | None)
        ...

    def encode_for_training(self, captions: list[str], dropout: float, generator: torch.Generator):
        ...

    def stored_states(self, states: torch.Tensor, dropout: float, generator: torch.Generator):
        ...

    def velocity(self) -> torch.nn.Module:
        ...

    def time_grid(self, steps: int) -> torch.Tensor:
        ...

    def solve(self, x0: torch.Tensor, cond, uncond, steps: int, guidance: float, solver: str | None = None,
              path: list | None = None) -> torch.Tensor:
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) in [0, 1]
        ...

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        ...

    def save(self, dirpath: str | Path, denoiser: torch.nn.Module | None = None) -> Path:
        ...
