"""Loading the diffusers models this project trains and distils, with errors that say what to do.

One loader serves both worlds: Stable Diffusion from a hub id or a local folder, and the
embedded miniature SD committed under ``assets/``. Nothing here runs at import; weights load
when a LightningModule's ``configure_model`` (or a tool) calls these functions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# Components the embedded teacher folder does not carry: they come from an installed package.
COMPONENTS_FILE = "instaflow_components.json"
PACKAGE_PREFIX = "package:"


class ModelNotFoundError(OSError):
    """A model id or folder could not be loaded; the message says what is missing and what to do."""


def _offline_hint() -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    return ("HF_HUB_OFFLINE=1 is set, so nothing could be downloaded" if offline
            else "nothing could be downloaded (no network, or the id does not exist)")


def resolve_path(spec: str) -> str:
    """``package:NAME`` -> the model folder an installed package ships; anything else unchanged."""
    if not spec.startswith(PACKAGE_PREFIX):
        return spec
    import importlib

    name = spec[len(PACKAGE_PREFIX):]
    try:
        mod = importlib.import_module(name)
    except ImportError as exn:
        raise ModelNotFoundError(
            f"'{spec}' names the Python package '{name}', which is not installed. "
            f"Install the project's pinned environment (make venv) or `pip install {name.replace('_', '-')}`."
        ) from exn
    return str(mod.get_model_path() if hasattr(mod, "get_model_path") else Path(mod.__file__).parent / "model")


def from_pretrained(cls: Any, pretrained: str, subfolder: str | None = None, what: str | None = None, **kw) -> Any:
    """``cls.from_pretrained`` with an error that names the missing model and how to provide it."""
    path = resolve_path(pretrained)
    try:
        return cls.from_pretrained(path, subfolder=subfolder, **kw) if subfolder else cls.from_pretrained(path, **kw)
    except (OSError, ValueError, EnvironmentError) as exn:
        where = f"{pretrained}/{subfolder}" if subfolder else pretrained
        local = Path(path).exists()
        raise ModelNotFoundError(
            f"could not load {what or cls.__name__} from '{where}': "
            + (f"the folder exists but is incomplete or invalid ({exn})." if local else
               f"no such local folder, and {_offline_hint()}. ")
            + ("" if local else
               f"Download it where the hub is reachable (`huggingface-cli download {pretrained} "
               f"--local-dir DIR`), copy DIR here, and point the config at it "
               f"(e.g. model.init_args.pretrained: DIR).")
        ) from exn


def component_sources(pretrained: str) -> dict:
    """Where the text encoder and tokenizer come from: the folder itself, or what it names."""
    path = Path(resolve_path(pretrained))
    cfg = {}
    if (path / COMPONENTS_FILE).exists():
        cfg = json.loads((path / COMPONENTS_FILE).read_text())
    # a bare model folder (e.g. the MiniLM package, or SD's text_encoder/ alone) has no subfolders
    bare = (path / "config.json").exists() and not (path / "model_index.json").exists()
    return {
        "text_encoder": cfg.get("text_encoder", pretrained),
        "text_encoder_subfolder": None if bare or "text_encoder" in cfg else "text_encoder",
        "tokenizer": cfg.get("tokenizer", pretrained),
        "tokenizer_subfolder": None if bare or "tokenizer" in cfg else "tokenizer",
        "max_length": cfg.get("max_length"),
        "kind": cfg.get("kind", "ddpm"),  # how to integrate: ddpm | flow | ddpm_velocity
    }


def load_vae(pretrained: str):
    from diffusers import AutoencoderKL

    return from_pretrained(AutoencoderKL, pretrained, "vae", what="VAE").eval().requires_grad_(False)


def load_tiny_decoder(pretrained: str):
    """A frozen diffusers ``AutoencoderTiny`` (e.g. TAESD, ``madebyollin/taesd``) from a folder or hub id."""
    from diffusers import AutoencoderTiny

    return from_pretrained(AutoencoderTiny, pretrained, what="AutoencoderTiny (the LPIPS loss's decoder)").eval() \
        .requires_grad_(False)


def load_unet(pretrained: str, subfolder: str = "unet"):
    """The folder's UNet: a UNet2DConditionModel, or the stacked U-Net when ``unet/config.json`` names it."""
    from diffusers import UNet2DConditionModel

    from instaflow.models.stacked_unet import CLASS_NAME, StackedUNet2DConditionModel

    try:  # the config alone (local, or the hub cache) says which class; failures surface in from_pretrained
        stacked = UNet2DConditionModel.load_config(resolve_path(pretrained), subfolder=subfolder).get(
            "_class_name") == CLASS_NAME
    except (OSError, ValueError):
        stacked = False
    cls = StackedUNet2DConditionModel if stacked else UNet2DConditionModel
    return from_pretrained(cls, pretrained, subfolder, what="stacked UNet" if stacked else "UNet")


def load_scheduler_config(pretrained: str) -> dict:
    """The teacher's noise schedule (DDPM alphas, prediction type) as a plain config dict."""
    from diffusers import DDPMScheduler

    return dict(from_pretrained(DDPMScheduler, pretrained, "scheduler", what="scheduler").config)


