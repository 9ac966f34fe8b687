"""What the families that wrap a whole diffusers pipeline share (SDXL, SD3, Flux, ...): the pipeline's own
denoiser, scheduler, text encoders and VAE, moved, decoded and saved through it.

The family's own pipeline is loaded (hub id or local folder, through ``loading.from_pretrained``, so a missing
model fails at once naming it and the local-folder fix) and its own ``encode_prompt`` makes the conditioning.
"""

from __future__ import annotations

from pathlib import Path

import torch

from instaflow.models import loading
from instaflow.models.families.base import FamilyBase, absent_components
from instaflow.state import atomic_write_json


class PipelineFamily(FamilyBase):
    """A family held as its diffusers pipeline ``pipe``; ``_denoiser``: the pipeline attribute of the trained network."""

    _denoiser = "transformer"
    pipe = None

    @classmethod
    def load_pipe(cls, pretrained: str, **extra):
        """The family's diffusers pipeline from ``pretrained`` (null components of its model_index.json as None)."""
        import diffusers

        pipe = loading.from_pretrained(getattr(diffusers, cls.pipeline_class), pretrained,
                                       what=f"{cls.title} pipeline", **{**absent_components(pretrained), **extra})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self._denoiser)

    @property
    def unet(self) -> torch.nn.Module:  # the name the SD stages used; the denoiser, whatever it is
        return self.denoiser

    @property
    def scheduler_config(self) -> dict:
        return dict(self.pipe.scheduler.config)

    def to(self, device: torch.device | str) -> "PipelineFamily":
        self.pipe.to(device)
        return self

    def text_encoders(self) -> list[torch.nn.Module]:
        return [te for te in (getattr(self.pipe, "text_encoder", None), getattr(self.pipe, "text_encoder_2", None),
                              getattr(self.pipe, "text_encoder_3", None)) if te is not None]

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        # registered on the LightningModule, so the strategy moves them with it
        return {"vae": self.pipe.vae.requires_grad_(False),
                "text_encoders": torch.nn.ModuleList([te.requires_grad_(False) for te in self.text_encoders()])}

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images (B, 3, H, W) in [0, 1], undoing the VAE's scaling (and shift) as the pipeline does."""
        vae = self.pipe.vae
        z = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        with self._autocast():
            return ((vae.decode(z.to(vae.dtype)).sample.float() + 1) / 2).clamp(0, 1)

    def saved_scheduler(self):
        """The scheduler the saved folder carries (flow-matching families: one whose default steps are ours)."""
        return self.pipe.scheduler

    def components_record(self) -> dict:
        """What ``instaflow_components.json`` says of a saved folder (kind, family, how plain diffusers samples it)."""
        return {"kind": self.kind, "family": self.name}

    def save(self, dirpath: str | Path, denoiser: torch.nn.Module | None = None) -> Path:
        """The pipeline folder (``denoiser`` in place of its own) plus ``instaflow_components.json``."""
        out = Path(dirpath)
        scheduler, own = self.pipe.scheduler, self.denoiser
        try:
            self.pipe.scheduler = self.saved_scheduler()
            if denoiser is not None:
                setattr(self.pipe, self._denoiser, denoiser)
            self.pipe.save_pretrained(out)
        finally:
            self.pipe.scheduler = scheduler
            setattr(self.pipe, self._denoiser, own)
        atomic_write_json(out / loading.COMPONENTS_FILE, self.components_record())
        return out
