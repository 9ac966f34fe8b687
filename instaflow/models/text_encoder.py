"""Frozen text encoders (SD's CLIP, the embedded world's MiniLM) as token states for the UNet."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instaflow.models.loading import component_sources, from_pretrained, resolve_path


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
