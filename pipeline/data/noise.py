"""Seeded synthetic label noise for experiments (which flagged samples were really wrong?)."""
from __future__ import annotations

import numpy as np

from pipeline.errors import CleanError
from pipeline.params import CHOICES

NOISE_KINDS = tuple(CHOICES["noise.kind"])


def validate_noise(rate: float, kind: str) -> None:
    """CleanError unless 0 <= rate < 1 and kind is one of NOISE_KINDS."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise CleanError(f"noise.rate must be a number with 0 <= noise.rate < 1, got {rate!r}; "
                         f"fix it in params.yaml")
    if kind not in NOISE_KINDS:
        raise CleanError(f"unknown noise.kind {kind!r}; use one of: {', '.join(NOISE_KINDS)}")


def _pair_targets(pairs: dict | None, num_classes: int) -> np.ndarray:
    """Map class -> target class as an int array [C]; -1 = class not eligible."""
    target = np.full(num_classes, -1, dtype=np.int64)
    if pairs is None:
        pairs = {c: (c + 1) % num_classes for c in range(num_classes)}
    for a, b in pairs.items():
        try:
            a_i, b_i = int(a), int(b)
        except (TypeError, ValueError):
            raise CleanError(f"noise.pairs entry {a!r}: {b!r} is not class_index: class_index") from None
        if not (0 <= a_i < num_classes and 0 <= b_i < num_classes):
            raise CleanError(f"noise.pairs entry {a!r}: {b!r} is out of range; class indices are "
                             f"0..{num_classes - 1}")
        if a_i != b_i:
            target[a_i] = b_i
    return target


def inject_noise(labels: np.ndarray, num_classes: int, rate: float, kind: str, seed: int,
                 pairs: dict[int, int] | None = None, mask: np.ndarray | None = None) -> np.ndarray:
    """Return a copy of int `labels` [N] with exactly round(rate * n_eligible) labels changed.

    Eligible samples: `mask` (bool [N], default all; e.g. only the train split), and for
    kind "pairs" only those whose class has a mapping. Changed samples are drawn uniformly
    without replacement with ``numpy.random.default_rng(seed)``. "symmetric": the new label
    is uniform over the other C-1 classes. "pairs": c -> pairs[c] (default c -> (c+1) % C).
    Samples outside `mask` are never touched.
    """
    validate_noise(rate, kind)
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    n = len(y)
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    eligible = np.ones(n, dtype=bool) if mask is None else np.asarray(mask, dtype=bool).copy()
    if eligible.shape != (n,):
        raise ValueError(f"mask has shape {eligible.shape}, expected ({n},)")
    new = y.copy()
    if rate == 0 or n == 0:
        return new
    if kind == "symmetric":
        if num_classes < 2:
            raise CleanError("symmetric label noise needs at least 2 classes; set noise.rate to 0")
        target = None
    else:
        target = _pair_targets(pairs, num_classes)
        eligible &= target[y] >= 0
    idx = np.flatnonzero(eligible)
    k = int(round(rate * len(idx)))
    if k == 0:
        return new
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(idx, size=k, replace=False))
    if target is None:
        new[chosen] = (y[chosen] + rng.integers(1, num_classes, size=k)) % num_classes
    else:
        new[chosen] = target[y[chosen]]
    return new
