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
class DescribesCouplings(Protocol):
    """A coupling generator: ``metadata()`` is written beside its shards; ``decode(x1)`` draws x1 for the grid."""

    def metadata(self) -> dict:
        ...

    def decode(self, x1: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) in [0, 1]
        ...


@runtime_checkable
class ShardingAware(Protocol):
    """A callback that says whether it can run beside an FSDP2-sharded module.

    Under FSDP2 every rank must take part in each forward (parameter all-gathers); a callback that
    runs the model on one rank alone would hang the run, and answers False.
    """

    def supports_sharded_module(self) -> bool:
        ...
