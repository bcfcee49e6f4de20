"""Seeded, label-stratified train/val/test assignment that respects official splits."""
from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.model_selection import train_test_split

from pipeline.errors import CleanError
from pipeline.formats.manifest import SPLITS



class SplitWarning(UserWarning):
    """A split could not be stratified by label (a class is too small); it was drawn at random."""


def validate_fractions(val_frac: float, test_frac: float) -> None:
    """CleanError unless 0 <= val_frac < 1, 0 <= test_frac < 1 and val_frac + test_frac < 1."""
    for key, f in (("data.val_frac", val_frac), ("data.test_frac", test_frac)):
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f < 1:
            raise CleanError(f"{key} must be a number with 0 <= {key} < 1, got {f!r}; fix it in params.yaml")
    if val_frac + test_frac >= 1:
        raise CleanError(f"data.val_frac + data.test_frac must be < 1, got {val_frac} + {test_frac}; "
                         f"lower one of them in params.yaml")


def _count(frac: float, n: int) -> int:
    """round(frac * n) (half up), at least 1 when frac > 0 and n > 0."""
    if frac <= 0 or n == 0:
        return 0
    return max(1, int(math.floor(frac * n + 0.5)))


def _carve(idx: np.ndarray, labels: np.ndarray, k: int, seed: int, name: str):
    """Take k of idx (stratified by label when possible) -> (taken, rest), both sorted."""
    try:
        rest, take = train_test_split(idx, test_size=k, stratify=labels[idx], random_state=seed)
    except ValueError as e:
        warnings.warn(SplitWarning(f"the {name} split is not stratified by label ({e}); "
                                   f"it was drawn at random instead"), stacklevel=3)
        rest, take = train_test_split(idx, test_size=k, random_state=seed, shuffle=True)
    return np.sort(take), np.sort(rest)


def assign_splits(labels: np.ndarray, official: list[str | None], val_frac: float,
                  test_frac: float, seed: int) -> np.ndarray:
    """Assign every sample to "train", "val" or "test"; returns a str array of shape [N].

    `labels`: int [N]; `official`: per-sample official split ("train"/"val"/"test") or None.
    Official test (and val) samples keep their split. The rest (official train or None)
    is the pool: test_frac of it becomes test (only when no official test exists), then
    val_frac of it becomes val (only when no official val exists). Each carve is
    stratified by label with seed `seed`; if a class is too small it falls back to a
    random draw and emits a :class:`SplitWarning` saying why. Same inputs -> same output.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if len(official) != n:
        raise ValueError(f"official has {len(official)} entries for {n} labels")
    validate_fractions(val_frac, test_frac)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CleanError(f"data.seed must be a non-negative integer, got {seed!r}")
    off = np.array(["" if s is None else str(s) for s in official], dtype=object)
    unknown = sorted(set(off.tolist()) - {"", *SPLITS})
    if unknown:
        raise CleanError(f"unknown official split name(s) {unknown}; allowed: {', '.join(SPLITS)}")

    out = np.full(n, "train", dtype="<U5")
    out[off == "test"] = "test"
    out[off == "val"] = "val"
    pool = np.flatnonzero((off == "") | (off == "train"))
    n_test = 0 if (off == "test").any() else _count(test_frac, len(pool))
    n_val = 0 if (off == "val").any() else _count(val_frac, len(pool))
    if len(pool) and n_test + n_val >= len(pool):
        raise CleanError(f"too few samples to split: {len(pool)} sample(s) for {n_test} test + "
                         f"{n_val} val leaves no training data; add images or lower "
                         f"data.val_frac / data.test_frac")
    rest = pool
    if n_test:
        take, rest = _carve(rest, labels, n_test, int(seed), "test")
        out[take] = "test"
    if n_val:
        take, rest = _carve(rest, labels, n_val, int(seed), "val")
        out[take] = "val"
    return out
