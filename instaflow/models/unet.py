"""Building, growing and naming UNets (a diffusers ``UNet2DConditionModel`` or the stacked U-Net)."""

from __future__ import annotations

import torch
from torch import nn


def build_unet(config: dict):
    """A UNet2DConditionModel (or a stacked U-Net, whose config holds ``unet``) from a config dict."""
    from diffusers import UNet2DConditionModel

    from instaflow.models.stacked_unet import StackedUNet2DConditionModel

    if isinstance(config.get("unet"), dict):
        return StackedUNet2DConditionModel.from_config(config)
    return UNet2DConditionModel(**config)


# Residual branches of a diffusers BasicTransformerBlock: zero them and the block is the identity.
_TRANSFORMER_BLOCK_OUTPUTS = ("attn1.to_out.0.", "attn2.to_out.0.", "ff.net.2.")


@torch.no_grad()
def warm_start_unet(unet: nn.Module, source: nn.Module) -> dict:
    """Start a grown UNet from a trained one (Net2Net, Chen et al. 2016): copy every tensor of ``source``
    into ``unet`` and zero the residual outputs of transformer blocks ``source`` lacks.

    Adding transformer layers (``transformer_layers_per_block``) this way leaves the function
    unchanged at step 0; changing the head count keeps the shapes but not the function. A source
    tensor the new UNet lacks, or has in another shape, is an error: nothing trained is dropped.
    """
    target = unet.state_dict()
    src = source.state_dict()
    missing = sorted(k for k in src if k not in target)
    reshaped = sorted(k for k in src if k in target and target[k].shape != src[k].shape)
    if missing or reshaped:
        raise ValueError(
            "warm start: the new UNet cannot hold every trained tensor of the source "
            f"(absent: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
            f"other shape: {reshaped[:5]}{'...' if len(reshaped) > 5 else ''}); grow the config, do not shrink it")
    new = [k for k in target if k not in src]
    for k, v in src.items():
        target[k].copy_(v)
    zeroed = [k for k in new if ".transformer_blocks." in k and any(o in k for o in _TRANSFORMER_BLOCK_OUTPUTS)]
    for k in zeroed:
        target[k].zero_()
    return {"copied": len(src), "new": len(new), "zeroed": len(zeroed)}


def unet_index_entry(unet: nn.Module) -> list[str]:
    """``model_index.json``'s [library, class] for a UNet: the stacked U-Net is a custom component (unet/*.py)."""
    from instaflow.models.stacked_unet import CLASS_NAME, MODULE_NAME, StackedUNet2DConditionModel

    return [MODULE_NAME, CLASS_NAME] if isinstance(unet, StackedUNet2DConditionModel) else \
        ["diffusers", "UNet2DConditionModel"]
