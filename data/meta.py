"""A sample's metadata (img2dataset's ``.json``): parsing it safely, and the caption filters that read it.

A ``.json`` member is untrusted: one larger than ``MAX_META_BYTES``, nested deeper than Python's
recursion limit (200k ``[``), not valid JSON or not a JSON object is *bad metadata*: the sample has
no metadata (``meta`` None), and a stream that requires metadata skips it as ``bad_meta``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

MAX_META_BYTES = 1 << 20  # img2dataset writes a few hundred bytes; a megabyte is not metadata


def parse_meta(data: bytes) -> tuple[dict | None, str]:
    """``(meta, "")`` for a JSON object, else ``(None, why)``: too large, too deep, not JSON, not an object."""
    if len(data) > MAX_META_BYTES:
        return None, f"{len(data)} bytes, more than {MAX_META_BYTES}"
    try:
        meta = json.loads(data)
    except RecursionError:  # e.g. 200k "[": nested deeper than the parser can go
        return None, "nested too deeply"
    except ValueError as exn:  # UnicodeDecodeError included
        return None, f"not JSON ({exn})"[:200]
    if not isinstance(meta, dict):
        return None, f"a JSON {type(meta).__name__}, not an object"
    return meta, ""


@dataclass
class CaptionFilters:
    """Bounds on a sample's caption and LAION metadata (img2dataset's ``.json``); None = not filtered.

    Caption length is in characters of the stripped caption. ``missing_field`` decides a sample
    whose ``.json`` is absent or lacks a bounded field (or holds null/NaN there): "drop" (the
    default: a sample that cannot be shown to pass is not used; counted as
    ``filtered_missing_<field>``) or "keep".
    """

    min_caption_chars: int | None = None
    max_caption_chars: int | None = None
    max_punsafe: float | None = None      # LAION's NSFW probability
    max_pwatermark: float | None = None   # LAION's watermark probability
    min_similarity: float | None = None   # CLIP image-text cosine similarity (LAION's filter was 0.28)
    missing_field: str = "drop"

    def __post_init__(self) -> None:
        if self.missing_field not in ("keep", "drop"):
            raise ValueError(f"missing_field must be 'keep' or 'drop', got {self.missing_field!r}")

    def reason(self, caption: str, meta: dict | None) -> str | None:
        """The ``filtered_*`` reason that drops this sample, or None to keep it."""
        n = len(caption)
        if (self.min_caption_chars is not None and n < self.min_caption_chars) or (
                self.max_caption_chars is not None and n > self.max_caption_chars):
            return "filtered_caption_length"
        for field, bound, is_max in (("punsafe", self.max_punsafe, True), ("pwatermark", self.max_pwatermark, True),
                                     ("similarity", self.min_similarity, False)):
            if bound is None:
                continue
            value = _number(meta.get(field) if isinstance(meta, dict) else None)
            if value is None:
                if self.missing_field == "drop":
                    return f"filtered_missing_{field}"
            elif (value > bound) if is_max else (value < bound):
                return f"filtered_{field}"
        return None


def _number(value: Any) -> float | None:
    """A finite float from a metadata value, else None (absent, null, NaN, not a number)."""
    if isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None
