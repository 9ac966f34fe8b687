"""LoRA students (peft, added to the UNet as diffusers' LoRA training examples do): add, save, merge.

Only the adapter weights train; the base weights stay the init's. What a LoRA student writes:
- the merged model (base + B A scaled by alpha / rank, folded into the weights): an ordinary model
  folder, so every later stage (couplings, distillation, export) reads it unchanged;
- ``lora/pytorch_lora_weights.safetensors``: the adapter alone, in diffusers' LoRA format, which
  ``pipe.load_lora_weights(folder / "lora")`` loads onto the base model's pipeline;
- ``lora/lora.json``: rank, alpha, target modules and the base model it adapts.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

LORA_DIR = "lora"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections (diffusers' LoRA examples)


def add_lora(unet: torch.nn.Module, rank: int, alpha: float | None = None,
             targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS) -> torch.nn.Module:
    """Freeze ``unet`` and add a LoRA adapter (rank ``rank``, scale alpha / rank) to ``targets``; in place.

    B starts at zero (peft's "gaussian" init draws A), so the student starts exactly as the base.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                                init_lora_weights="gaussian", target_modules=list(targets)))
    return unet


def has_lora(unet: torch.nn.Module) -> bool:
    return bool(getattr(unet, "peft_config", None))


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers' LoRA naming (what ``save_lora_weights`` writes)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def merged(unet: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``unet`` with the adapter folded into the base weights and the LoRA layers removed."""
    out = copy.deepcopy(unet)
    out.fuse_lora()
    out.unload_lora()
    return out


def save_lora(unet: torch.nn.Module, folder: str | Path, base: str, rank: int, alpha: float | None,
              targets: list[str] | tuple[str, ...], family: str = "sd") -> Path:
    """Write ``folder/lora/`` (diffusers LoRA weights + lora.json); returns that folder.

    SD 1.x/2.x and SDXL: a UNet LoRA (``StableDiffusionLoraLoaderMixin``'s format, which SDXL's loader
    reads too); SD3 / Flux: a transformer LoRA in the format diffusers' SD3 / Flux LoRA training writes
    (``SD3LoraLoaderMixin`` / ``FluxLoraLoaderMixin``, peft state dict under ``transformer.``).
    """
    out = Path(folder) / LORA_DIR
    if family in ("sd3", "flux"):
        from diffusers.loaders import FluxLoraLoaderMixin, SD3LoraLoaderMixin
        from peft.utils import get_peft_model_state_dict

        mixin = SD3LoraLoaderMixin if family == "sd3" else FluxLoraLoaderMixin
        mixin.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True)
    else:
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        StableDiffusionLoraLoaderMixin.save_lora_weights(out, unet_lora_layers=lora_state_dict(unet),
                                                         safe_serialization=True)
    (out / "lora.json").write_text(json.dumps({"base": base, "family": family, "rank": rank,
                                               "alpha": alpha if alpha is not None else rank,
                                               "target_modules": list(targets)}, indent=2))
    return out
