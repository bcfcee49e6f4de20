"""Checks of user-supplied values shared by the rules and strategies (one CleanError wording)."""
from __future__ import annotations

import numpy as np

from pipeline.errors import CleanError


def fmt(x) -> str:
    """Short repr of a user-supplied param for error messages."""
    return repr(x) if isinstance(x, str) else f"{x}"


def as_float(x, name: str) -> float:
    """float(x), or CleanError "<name> must be a number, got <x>" (bools are not numbers)."""
    if isinstance(x, bool):
        raise CleanError(f"{name} must be a number, got {fmt(x)}")
    try:
        return float(x)
    except (TypeError, ValueError):
        raise CleanError(f"{name} must be a number, got {fmt(x)}") from None


def check_seed(seed) -> int:
    """An integer seed in 0 .. 2**32 - 1 (what numpy's and torch's generators take), else CleanError."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CleanError(f"seed must be a non-negative integer, got {fmt(seed)}")
    if seed > 2**32 - 1:
        raise CleanError(f"seed must be at most 4294967295 (2**32 - 1), got {fmt(seed)}")
    return int(seed)
