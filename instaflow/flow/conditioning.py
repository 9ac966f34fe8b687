"""What the text side hands a denoiser, for every family, and how a UNet is called with it.

SD 1.x/2.x: token states (B, L, D), a bare tensor. SDXL: token states of both encoders concatenated,
the second encoder's pooled projection (B, P) and ``time_ids`` (B, 6: original size, crop corner,
target size), passed as the UNet's ``added_cond_kwargs`` (Podell et al. 2023, SDXL, sec. 2.2).
SD3: token states and pooled embeddings (``flow_matching``). Flux: T5 states, CLIP pooled and, for
guidance-distilled checkpoints, the guidance scale as an input (no unconditional pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass
class Conditioning:
    """Token states (B, L, D), pooled embeddings (B, P) and SDXL's extra ids (B, 6); ``cat`` stacks along
    the batch (classifier-free guidance); ``to`` casts the float tensors."""

    states: Tensor
    pooled: Tensor | None = None
    time_ids: Tensor | None = None
    guidance: Tensor | None = None  # (B,): the guidance *input* of guidance-distilled models (Flux dev)

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        def join(name):
            parts = [getattr(c, name) for c in items]
            return None if parts[0] is None else torch.cat(parts)

        return Conditioning(join("states"), join("pooled"), join("time_ids"), join("guidance"))

    def to(self, dtype: torch.dtype) -> "Conditioning":
        cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
        return Conditioning(cast(self.states), cast(self.pooled), cast(self.time_ids), self.guidance)


def call_unet(unet, x: Tensor, timestep: Tensor, cond: Tensor | Conditioning) -> Tensor:
    """``unet(x, timestep)`` with text states, or with a ``Conditioning`` (SDXL's pooled text and time ids)."""
    if isinstance(cond, Tensor):
        return unet(x, timestep, encoder_hidden_states=cond).sample
    added = None if cond.pooled is None else {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
    return unet(x, timestep, encoder_hidden_states=cond.states, added_cond_kwargs=added).sample
