"""Checks of user-supplied values shared by the rules and strategies (one CleanError wording)."""
from __future__ import annotations

import os
import stat

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


def input_file(path, need: str, folder: str | None = None) -> os.stat_result | None:
    """os.stat of an input that must be a regular file, or None when it does not exist.

    A path that cannot be stat'ed, a folder, or a pipe/device/socket (a read could block forever)
    ends in one CleanError naming the path and the fix: `need` (`folder`, when given, for a folder)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CleanError(f"{path}: cannot be read ({e.strerror or e}); fix its permissions or give another file") from None
    if stat.S_ISDIR(st.st_mode):
        raise CleanError(f"{path} is a folder; {folder or need}")
    if not stat.S_ISREG(st.st_mode):
        raise CleanError(f"{path} is not a regular file (a pipe or a device); {need}")
    return st
