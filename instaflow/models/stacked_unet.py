"""Stacked U-Net (InstaFlow-1.7B): two SD U-Nets in series, no weight sharing, middle blocks removed.

    h = unet_1(x_t, timestep, text)          # the init U-Net without its middle block
    out = h + unet_2(h, timestep, text)      # a second U-Net of the same shape refines h

The paper states only "two U-Nets in series, middle block removed". How it is initialised is our
choice: both halves get the init model's (the 2-RF's) weights, and the second half's output
convolution is zeroed, so the stacked net starts as the 2-RF without its middle block (the residual
branch is exactly zero at step 0 and its conv_out receives gradients from the first step on).

Saved as one diffusers model folder, ``unet/``: ``config.json`` (``_class_name``
``StackedUNet2DConditionModel``, the halves' shared config under ``unet``), one weights file whose
keys start ``unet_1.`` / ``unet_2.``, and this file as ``stacked_unet.py``, so diffusers alone loads
the folder as a custom component (``model_index.json``: ``"unet": ["stacked_unet",
"StackedUNet2DConditionModel"]``, ``trust_remote_code=True``). This file imports only torch and
diffusers for that reason.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

CLASS_NAME = "StackedUNet2DConditionModel"
MODULE_NAME = "stacked_unet"  # the file name diffusers' custom-component loader looks for in unet/
# read from the halves and repeated at the top of the config, where the code reads a UNet's
DERIVED = ("sample_size", "in_channels", "out_channels", "cross_attention_dim")


def half_config(config: dict) -> dict:
    """A UNet2DConditionModel config without private keys and without the middle block."""
    cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    cfg["mid_block_type"] = None  # diffusers' forward skips step 4 (mid) when mid_block is None
    return cfg


class StackedUNet2DConditionModel(ModelMixin, ConfigMixin):
    """Two mid-block-free UNet2DConditionModels in series with a residual; called like one UNet.

    Args:
        unet: the config of one half (a UNet2DConditionModel config; ``mid_block_type`` is forced to None).
        sample_size, in_channels, out_channels, cross_attention_dim: filled from the halves (given
            values must agree), so ``.config.sample_size`` etc. read as on a UNet.
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = True
    mid_block = None  # for code that walks down_blocks / mid_block / up_blocks (FSDP2 wrapping)

    @register_to_config
    def __init__(self, unet: dict, sample_size=None, in_channels=None, out_channels=None,
                 cross_attention_dim=None) -> None:
        super().__init__()
        cfg = half_config(unet)
        self.unet_1 = UNet2DConditionModel(**cfg)
        self.unet_2 = UNet2DConditionModel(**cfg)
        given = dict(sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
                     cross_attention_dim=cross_attention_dim)
        derived = {k: self.unet_1.config[k] for k in DERIVED}
        bad = {k: v for k, v in given.items() if v is not None and _plain(v) != _plain(derived[k])}
        if bad:
            raise ValueError(f"{CLASS_NAME}: {bad} disagree with the halves' config {derived}")
        if derived["in_channels"] != derived["out_channels"]:
            raise ValueError("stacking needs out_channels == in_channels: the second U-Net reads the first's output")
        self.register_to_config(unet=half_config(self.unet_1.config), **derived)

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel) -> "StackedUNet2DConditionModel":
        """Both halves from ``unet``'s weights (its middle block dropped); the second's conv_out zeroed."""
        stacked = cls(unet=dict(unet.config)).to(device=unet.device, dtype=unet.dtype)
        state = {k: v for k, v in unet.state_dict().items() if not k.startswith("mid_block.")}
        for half in (stacked.unet_1, stacked.unet_2):
            half.load_state_dict(state, strict=True)
        with torch.no_grad():  # out = h + 0 at step 0: the stacked net starts at the init U-Net sans mid block
            stacked.unet_2.conv_out.weight.zero_()
            stacked.unet_2.conv_out.bias.zero_()
        return stacked

    @property
    def down_blocks(self) -> list:
        return list(self.unet_1.down_blocks) + list(self.unet_2.down_blocks)

    @property
    def up_blocks(self) -> list:
        return list(self.unet_1.up_blocks) + list(self.unet_2.up_blocks)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                return_dict: bool = True, **kwargs):
        """UNet2DConditionModel's call: (B, C, h, w), timestep, (B, L, D) -> ``.sample`` (B, C, h, w)."""
        h = self.unet_1(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs).sample
        out = h + self.unet_2(h, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs).sample
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """diffusers' save, plus this file next to the weights (the folder then loads without this project)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        shutil.copyfile(Path(__file__), Path(save_directory) / f"{MODULE_NAME}.py")


def _plain(v):
    return list(v) if isinstance(v, (list, tuple)) else v
