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

    Works for SD's CLIPTextModel and the embedded world's MiniLM (a BertModel). The cache keeps the
    states of recent captions in CPU memory (the embedded world repeats captions across epochs, and
    encoding costs more than a UNet step on CPU) and moves them to the model's device on use; it is
    bounded by ``cache_mb`` (bytes: each entry is L x D x the states' element size, e.g. 77 x 768 x 4 =
    236 KB for SD 1.5 in fp32) and by ``cache_size`` entries, least recently used first out. Kept on the
    accelerator, 100k SD 1.5 captions would take 24 GB of it hours into a run. States encoded under
    autocast are cached apart from fp32 ones (the same caption can be asked for in both).
    """

    def __init__(self, tokenizer: Any, model: nn.Module, max_length: int | None = None, cache_size: int = 0,
                 cache_mb: float | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_length = max_length or min(int(tokenizer.model_max_length), 512)
        self.cache_size = cache_size  # entries (0: no entry bound when cache_mb is set)
        self.cache_mb = cache_mb  # CPU megabytes (None: only the entry bound)
        self._cache: OrderedDict[str | tuple, torch.Tensor] = OrderedDict()
        self._cache_bytes = 0
        self._empty: torch.Tensor | None = None

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def cache_bytes(self) -> int:
        """Bytes the cached states take (CPU memory)."""
        return self._cache_bytes

    @property
    def caching(self) -> bool:
        return bool(self.cache_mb) if self.cache_mb is not None else bool(self.cache_size)

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

    def _key(self, caption: str) -> str | tuple:
        """Cache key: the caption, with the autocast dtype when it is encoded under autocast."""
        kind = self.device.type
        return (caption, torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else caption

    def _over_budget(self) -> bool:
        over_bytes = self.cache_mb is not None and self._cache_bytes > self.cache_mb * 2**20
        return over_bytes or (bool(self.cache_size) and len(self._cache) > self.cache_size)

    def _store(self, key: str | tuple, states: torch.Tensor) -> None:
        """Keep one caption's states (L, D) on CPU, evicting the least recently used beyond the bounds."""
        entry = states.to("cpu", copy=True)  # a copy: never a view pinning the whole batch's storage
        if self.cache_mb is not None and entry.numel() * entry.element_size() > self.cache_mb * 2**20:
            return  # one entry alone exceeds the budget
        self._cache[key] = entry
        self._cache_bytes += entry.numel() * entry.element_size()
        while self._over_budget():
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.numel() * old.element_size()

    @torch.no_grad()
    def forward(self, captions: list[str]) -> torch.Tensor:
        if not self.caching:
            return self._encode(captions)
        keys = [self._key(c) for c in captions]
        missing = list(dict.fromkeys(k for k in keys if k not in self._cache))
        fresh = dict(zip(missing, self._encode([k if isinstance(k, str) else k[0] for k in missing]))) if missing else {}
        out = torch.stack([fresh[k] if k in fresh else self._cache[k].to(self.device, non_blocking=True)
                           for k in keys])
        for k in keys:
            if k in self._cache:
                self._cache.move_to_end(k)
        for k, h in fresh.items():
            self._store(k, h)
        return out


def load_text_encoder(pretrained: str, max_length: int | None = None, cache_size: int = 0,
                      cache_mb: float | None = None) -> TextEncoder:
    """The text encoder and tokenizer of a pipeline folder or hub id (or what its components file names);
    ``cache_size`` / ``cache_mb``: the CPU cache's bounds (entries / megabytes, ``TextEncoder``)."""
    from transformers import AutoModel, AutoTokenizer, CLIPTextModel

    src = component_sources(pretrained)
    tok = from_pretrained(AutoTokenizer, src["tokenizer"], src["tokenizer_subfolder"], what="tokenizer")
    te_path = resolve_path(src["text_encoder"])
    sub = src["text_encoder_subfolder"]
    cfg_file = Path(te_path, sub or "", "config.json")
    # CLIPTextModel must be named: AutoModel would build the two-tower CLIPModel from SD's config.
    is_clip = cfg_file.exists() and '"clip_text_model"' in cfg_file.read_text()
    model = from_pretrained(CLIPTextModel if is_clip else AutoModel, src["text_encoder"], sub, what="text encoder")
    return TextEncoder(tok, model, max_length=max_length or src["max_length"], cache_size=cache_size,
                       cache_mb=cache_mb)
