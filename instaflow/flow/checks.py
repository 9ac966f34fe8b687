"""Settings checked when a module is built: one rule for a number, so every bad value fails the same way,
naming its key, instead of surfacing hours into a run."""

from __future__ import annotations

import math
import numbers
from typing import Callable


def is_whole(n, minimum: int) -> bool:
    """Whether ``n`` is a whole number (an int, or a float such as 25.0) >= ``minimum``; never raises."""
    try:
        return isinstance(n, numbers.Real) and not isinstance(n, bool) and float(n) == int(n) and n >= minimum
    except (ValueError, OverflowError):  # NaN, inf
        return False


def checked_number(x, key: str, ok: Callable[[float], bool], expect: str) -> float:
    """``x`` as a float, or a ValueError ``"<key> must be <expect>, got <x>"`` unless it is a finite number with
    ``ok(x)``."""
    try:
        value = float(x)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or not ok(value):
        raise ValueError(f"{key} must be {expect}, got {x!r}")
    return value
