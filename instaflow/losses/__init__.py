"""Training losses as objects (NVlabs/edm's ``training/loss.py`` style: each loss a small class), named in YAML by
``class_path`` under a stage's ``loss:`` (``lightning_modules.distill`` / ``reflow``); ``docs/losses.md`` says how
to add one. A loss may own trained networks with their own optimizer settings (``Loss.trained_networks``,
``NetworkOptimizer``): the stage puts them in its one AdamW as their own parameter groups, checkpoints, shards
and resumes them through its own code path.

Layer: above ``instaflow.models`` (LPIPS loads a feature network and decodes with the model's VAE), beside
``instaflow.evaluation``; the stages (``lightning_modules``) use it.
"""

from instaflow.losses.base import Loss, NetworkOptimizer, ParamGroup, adamw_param_groups
from instaflow.losses.perceptual import LPIPS, LPIPSHuber
from instaflow.losses.regression import L2, PseudoHuber

__all__ = ["L2", "LPIPS", "LPIPSHuber", "Loss", "NetworkOptimizer", "ParamGroup", "PseudoHuber", "adamw_param_groups"]
