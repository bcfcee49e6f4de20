"""Which end of a score is suspicious, and the order "most suspicious first".

Most scores are suspicious when high; the SCORES registry marks those suspicious when *low*
(margin, aum, confidence). Every stage that ranks or thresholds a score reads it from here.
"""
from __future__ import annotations

import numpy as np

from pipeline.registry import SCORES


def low_is_suspicious(by: str) -> bool:
    """True when a *low* value of score `by` marks a suspicious sample (registry entry)."""

    entry = SCORES.get(by)
    return entry is not None and entry.suspicious == "low"


def oriented(values, by: str) -> tuple[np.ndarray, str]:
    """(values with high = suspicious, display name): low-is-suspicious scores are negated as `-by`."""
    v = np.asarray(values, dtype=np.float64)
    return (-v, f"-{by}") if low_is_suspicious(by) else (v, by)


def top_order(values, by: str = "", ids=None) -> np.ndarray:
    """Indices [N] of `values` [N] from most to least suspicious for score `by`.

    Descending (ascending for low-is-suspicious scores); ties by `ids` [N] ascending
    (default: position); NaN always last.
    """
    v = np.asarray(values, dtype=np.float64)
    key = v.copy() if low_is_suspicious(by) else -v
    key[np.isnan(key)] = np.inf
    tie = np.arange(v.size) if ids is None else np.asarray(ids)
    return np.lexsort((tie, key))


def ranks(values, by: str = "", ids=None) -> np.ndarray:
    """Rank [N] (0 = most suspicious) of each sample under :func:`top_order`."""
    order = top_order(values, by, ids)
    r = np.empty(order.size, dtype=np.int64)
    r[order] = np.arange(order.size)
    return r
