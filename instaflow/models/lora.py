"""LoRA students (peft, added to the UNet as diffusers' LoRA training examples do): add, save, merge.

Only the adapter weights train; the base weights stay the init's. What a LoRA student writes:
- the merged model (base + B A scaled by alpha / rank, folded into the weights): an ordinary model
  folder, so every later stage (couplings, distillation, export) reads it unchanged;
- ``lora/pytorch_lora_weights.safetensors``: the adapter alone, in diffusers' LoRA format, which
  ``pipe.load_lora_weights(folder / "lora")`` loads onto the base model's pipeline; its safetensors
  metadata carries the adapter's config (``lora_adapter_metadata``: rank, alpha, targets), so diffusers
  scales it by alpha / rank (without it diffusers assumes alpha = rank);
- ``lora/lora.json``: rank, alpha, target modules and the base model it adapts.

The merge never copies the denoiser: each adapted layer's merged weight is computed alone and kept on
the CPU, every other tensor is the live network's own, so exporting a Flux-sized LoRA student costs
the adapted layers' weights in host memory, not a second denoiser on the accelerator.
"""

from __future__ import annotations

from pathlib import Path

import torch

from instaflow.state import atomic_write_json

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


def adapter_config(unet: torch.nn.Module) -> dict:
    """The (single) adapter's peft config as diffusers' training scripts store it (``lora_adapter_metadata``)."""
    configs = getattr(unet, "peft_config", None) or {}
    if len(configs) != 1:
        raise ValueError(f"expected one LoRA adapter on the network, found {sorted(configs)}")
    out = next(iter(configs.values())).to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in out.items()}


@torch.no_grad()
def merged_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The plain network's state dict with the active adapter folded in, as peft's merge computes it.

    Each adapted layer's weight (base + its delta) is computed alone and kept on the CPU; every other
    tensor is the network's own (shared, not copied). ``unet`` is left exactly as it was.
    """
    from peft.tuners.lora import LoraLayer

    state = unet.state_dict()  # detached tensors sharing the network's storage: no copy
    for name, layer in unet.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        prefix = f"{name}." if name else ""
        active = [a for a in layer.active_adapters if a in layer.lora_A.keys()]
        if layer.merged or any(a in layer.lora_variant or layer.lora_bias[a] for a in active):
            raise NotImplementedError(f"{name}: only unmerged plain LoRA (no DoRA, no lora_bias) is merged here")
        for key in [k for k in state if k.startswith(prefix)]:
            rest = key[len(prefix):]
            if rest.split(".")[0] in LoraLayer.adapter_layer_names:
                del state[key]
            elif rest.startswith("base_layer."):
                state[prefix + rest[len("base_layer."):]] = state.pop(key)
        weight = state[prefix + "weight"].to("cpu", copy=True)
        for a in active:  # peft's merge: weight += delta (in the weight's dtype), one layer at a time
            weight += layer.get_delta_weight(a).to("cpu")
        state[prefix + "weight"] = weight
    return state


def merged(unet: torch.nn.Module) -> torch.nn.Module:
    """The network with its adapter folded in and the LoRA layers gone, for saving: ``merged_state_dict`` in a
    module built on the meta device (no memory) and given those tensors, so nothing is copied on the device."""
    state = merged_state_dict(unet)
    with torch.device("meta"):
        plain = type(unet).from_config(dict(unet.config))
    plain.load_state_dict(state, strict=True, assign=True)
    return plain.eval()


def save_lora(unet: torch.nn.Module, folder: str | Path, base: str, rank: int, alpha: float | None,
              targets: list[str] | tuple[str, ...], family) -> Path:
    """Write ``folder/lora/`` (diffusers LoRA weights + lora.json); returns that folder.

    ``family`` (an ``instaflow.contracts.Family``) writes the weights in its loader's format
    (``write_lora_weights``: a UNet LoRA for SD 1.x/2.x and SDXL, a transformer LoRA for SD3 / Flux).
    """
    out = Path(folder) / LORA_DIR
    # the adapter's config goes into the file's metadata, which load_lora_weights reads: without it
    # diffusers rebuilds the config from the weights' shapes alone and scales by 1 (alpha = rank)
    family.write_lora_weights(out, unet, adapter_config(unet))
    atomic_write_json(out / "lora.json", {"base": base, "family": family.name, "rank": rank,
                                          "alpha": alpha if alpha is not None else rank,
                                          "target_modules": list(targets)})
    return out
