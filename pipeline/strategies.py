"""Prune strategies (remedies): which training samples to keep. The STRATEGIES registry.

Each strategy is one registered function below; :func:`select` keeps a fraction ``keep`` of
the training set by one of them (docs/methods.md §3), optionally class-balanced; :func:`summary` and :func:`label_entropy` describe
the kept set (kept per class, label entropy: top-gradient selection skews the class mix).

Strategies (``prune.strategy``):

- ``random``        uniform without replacement: ``Generator(seed).choice(N, n_keep, replace=False)``.
- ``max-gradient``  the n_keep largest scores; ties broken by index (lower index first).
- ``non-extreme``   sort descending (stable), skip the top round(skip*N), keep the next n_keep.
                    If fewer than n_keep remain after the skip, the shortfall is taken from the
                    skipped samples closest to the boundary (the lowest-scoring skipped ones),
                    i.e. the kept window is the n_keep consecutive ranks starting at
                    min(n_skip, N - n_keep).
- ``gradient-cdf``  sampling without replacement with P(i) proportional to g_i (successive
                    sampling), implemented with the vectorised Efraimidis–Spirakis
                    exponential-keys method: key_i = E_i / g_i with E_i ~ Exp(1) i.i.d., keep the
                    n_keep smallest keys. Scores must be finite and >= 0. Zero scores have zero
                    probability; only if fewer than n_keep scores are positive are all positive
                    ones kept and the rest drawn uniformly (without replacement) from the zeros.
- ``drop-flagged``  keep every sample whose ``flagged`` is False; ``keep`` (and ``balanced``,
                    ``seed``, ``scores``) have no effect. Keeping nothing is an error.
- ``drop-harmful``  drop the samples flags.csv marks ``is_harmful`` (val_influence < 0: a step on
                    them raises the validation loss); like drop-flagged otherwise.
- ``drop-flagged-harmful``  drop the samples that are both a label issue and harmful
                    (``is_label`` ∧ ``is_harmful``): hard but helpful flagged images stay.
                    These two read their issue types from the entry (``issues``, all of them
                    must hold), not from prune.drop: :func:`issue_mask`.

``balanced=True`` applies the strategy within each class with quota n_keep_c proportional to
the class size (largest-remainder rounding, exact integer arithmetic, ties to the smaller class
id, so the quotas sum exactly to n_keep); the per-class random generator is seeded with
``numpy.random.default_rng([seed, class_id])``, and ``non-extreme`` skips round(skip*N_c)
within each class.

n_keep = round(keep*N) (Python's round: halves go to the even integer) clipped to [1, N].
"""
from __future__ import annotations

import math

import numpy as np

from pipeline.checks import as_float as _as_float
from pipeline.checks import check_seed as _check_seed
from pipeline.checks import fmt as _fmt
from pipeline.errors import CleanError
from pipeline.registry import STRATEGIES


# --------------------------------------------------------------------------- validation


def _check_labels(labels, n: int | None = None) -> np.ndarray:
    """1-D non-negative integer class ids (integral floats accepted)."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise CleanError(f"labels must be a 1-D array [N], got shape {y.shape}")
    if n is not None and y.shape[0] != n:
        raise CleanError(f"labels has {y.shape[0]} entries but scores has {n}; they must match")
    if y.dtype.kind not in "iu":
        if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():
            pass
        elif y.size == 0:
            pass
        else:
            raise CleanError(f"labels must be integer class ids, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise CleanError(f"labels must be non-negative class ids, got {int(y.min())}")
    return y


def n_keep_for(keep: float, n: int) -> int:
    """n_keep = round(keep*N) clipped to [1, N]; keep must be in (0, 1]."""
    k = _as_float(keep, "prune.keep")
    if not (0.0 < k <= 1.0):
        raise CleanError(f"prune.keep must be in (0, 1], got {_fmt(keep)}")
    return int(min(n, max(1, round(k * n))))


def class_quotas(counts, n_keep: int) -> np.ndarray:
    """Largest-remainder quotas: int [C] proportional to ``counts`` [C], summing to n_keep.

    quota_c = floor(n_keep*N_c/N) plus one for the classes with the largest remainders
    (ties: smaller class index first). Exact integer arithmetic; quota_c <= N_c.
    """
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros_like(counts)
    num = counts * int(n_keep)
    base = num // total
    rem = num % total
    short = int(n_keep) - int(base.sum())
    order = np.lexsort((np.arange(counts.size), -rem))  # largest remainder, then index
    base[order[:short]] += 1
    return base


# --------------------------------------------------------------------------- strategies


def _desc_order(scores: np.ndarray) -> np.ndarray:
    """Indices sorted by score descending; ties by index ascending."""
    return np.lexsort((np.arange(scores.size), -scores))


@STRATEGIES.register("random", doc="uniform without replacement (the baseline)")
def random_subset(scores: np.ndarray, n: int, rng: np.random.Generator, skip: float) -> np.ndarray:
    """n indices drawn uniformly without replacement."""
    return rng.choice(scores.size, size=n, replace=False)


@STRATEGIES.register("max-gradient", needs=("score",), doc="keep the largest prune.by")
def max_gradient(scores: np.ndarray, n: int, rng: np.random.Generator, skip: float) -> np.ndarray:
    """The n largest scores; ties by index."""
    return _desc_order(scores)[:n]


@STRATEGIES.register("non-extreme", needs=("score",), doc="skip the top prune.skip, then keep the largest")
def non_extreme(scores: np.ndarray, n: int, rng: np.random.Generator, skip: float) -> np.ndarray:
    """Sort descending, skip the top round(skip·N), keep the next n (window shifted up if short)."""
    size = scores.size
    start = min(int(round(skip * size)), size - n)
    return _desc_order(scores)[start : start + n]


@STRATEGIES.register("gradient-cdf", needs=("score",), doc="sample ∝ prune.by, without replacement")
def gradient_cdf(scores: np.ndarray, n: int, rng: np.random.Generator, skip: float) -> np.ndarray:
    """Successive sampling with P(i) ∝ g_i (Efraimidis–Spirakis keys E_i / g_i); zeros last."""
    pos = np.flatnonzero(scores > 0)
    if pos.size >= n:
        keys = rng.standard_exponential(pos.size) / scores[pos]
        return pos[np.argsort(keys, kind="stable")[:n]]
    zeros = np.flatnonzero(scores <= 0)
    fill = rng.choice(zeros, size=n - pos.size, replace=False)
    return np.concatenate([pos, fill])


@STRATEGIES.register("drop-flagged", needs=("flags",), doc="keep everything `clean flag` did not flag")
def drop_flagged(flagged: np.ndarray) -> np.ndarray:
    """Indices of the samples not flagged (bool [N], True = drop)."""
    return _keep_unmarked(flagged, "drop-flagged", "flagged")


@STRATEGIES.register("drop-harmful", needs=("flags",), issues=("harmful",),
                     doc="drop the images with val_influence < 0 (flags.csv is_harmful)")
def drop_harmful(flagged: np.ndarray) -> np.ndarray:
    """Indices of the samples not harmful (bool [N], True = is_harmful = drop)."""
    return _keep_unmarked(flagged, "drop-harmful", "harmful")


@STRATEGIES.register("drop-flagged-harmful", needs=("flags",), issues=("label", "harmful"),
                     doc="drop the images that are both a label issue and harmful")
def drop_flagged_harmful(flagged: np.ndarray) -> np.ndarray:
    """Indices of the samples kept (bool [N], True = is_label ∧ is_harmful = drop)."""
    return _keep_unmarked(flagged, "drop-flagged-harmful", "both a label issue and harmful")


def _keep_unmarked(flagged: np.ndarray, name: str, what: str) -> np.ndarray:
    f = np.asarray(flagged)
    if f.dtype.kind != "b":
        if not np.isin(f, (0, 1)).all():
            raise CleanError(f"flagged must be boolean (or 0/1), got dtype {f.dtype}")
        f = f.astype(bool)
    kept = np.flatnonzero(~f).astype(np.int64)
    if kept.size == 0:
        raise CleanError(f"{name} would keep 0 of {f.shape[0]} samples: every sample is {what}")
    return kept


def issue_mask(flags, strategy: str, flags_csv) -> np.ndarray | None:
    """bool [N] to drop for a strategy whose entry names its issue types (``issues``: a sample is
    dropped when it has all of them, flags.csv ``is_<type>``); None for the other strategies."""
    types = STRATEGIES[strategy].extra.get("issues")
    if not types:
        return None
    missing = [t for t in types if f"is_{t}" not in flags.columns]
    if missing:
        why = (" (the flag stage skips harmful when scores.csv has no val_influence: score with "
               "score.val_influence: true and a val split)" if "harmful" in missing else "")
        raise CleanError(f"prune.strategy = {strategy} needs is_{missing[0]} in {flags_csv}, which has none{why}; "
                         "re-run `clean flag` with that issue type")
    out = np.ones(len(flags), bool)
    for t in types:
        out &= flags[f"is_{t}"].to_numpy().astype(bool)
    return out


def _pick(scores: np.ndarray, n: int, strategy: str, rng: np.random.Generator, skip: float) -> np.ndarray:
    """n local indices (unsorted) of ``scores`` chosen by the registered ``strategy``."""
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    return STRATEGIES[strategy].fn(scores, n, rng, skip)


def select(
    scores,
    labels,
    strategy: str,
    keep: float,
    seed: int,
    balanced: bool = False,
    skip: float = 0.05,
    flagged=None,
) -> np.ndarray:
    """Choose the samples to keep; returns their SORTED indices, int64 [n_kept].

    scores: float [N] importance scores (e.g. grad_norm); labels: int [N] class ids;
    strategy: one of :data:`STRATEGIES`; keep in (0, 1] (n_keep = round(keep*N) in [1, N]);
    seed: int >= 0; balanced: select per class with size-proportional quotas;
    skip in [0, 1): top fraction skipped by ``non-extreme``;
    flagged: bool [N], required by ``drop-flagged`` (True = drop).
    """
    if strategy not in STRATEGIES:
        raise CleanError(
            f"prune.strategy must be one of: {', '.join(STRATEGIES.names())}; got {_fmt(strategy)}"
        )
    try:
        s = np.asarray(scores, dtype=float)
    except (TypeError, ValueError):
        raise CleanError("scores must be a numeric array") from None
    if s.ndim != 1:
        raise CleanError(f"scores must be a 1-D array [N], got shape {s.shape}")
    n = s.size
    if n == 0:
        raise CleanError("nothing to select from: the score vector is empty")
    y = _check_labels(labels, n)

    if "flags" in STRATEGIES[strategy].needs:
        if flagged is None:
            raise CleanError(
                f"prune.strategy '{strategy}' needs the flag stage's output (flagged); "
                "run `clean flag` first or choose another strategy"
            )
        f = np.asarray(flagged)
        if f.shape != (n,):
            raise CleanError(f"flagged must be a 1-D array [N] with N = {n}, got shape {f.shape}")
        return STRATEGIES[strategy].fn(f)

    n_keep = n_keep_for(keep, n)
    seed = _check_seed(seed)
    sk = _as_float(skip, "prune.skip")
    if not (0.0 <= sk < 1.0):
        raise CleanError(f"prune.skip must be in [0, 1), got {_fmt(skip)}")
    if "score" in STRATEGIES[strategy].needs:
        bad = int(np.count_nonzero(~np.isfinite(s)))
        if bad:
            raise CleanError(f"strategy '{strategy}' needs finite scores; {bad} are NaN/inf")
    if strategy == "gradient-cdf" and (s < 0).any():
        raise CleanError(
            f"strategy 'gradient-cdf' needs scores >= 0 (sampling weights); "
            f"{int(np.count_nonzero(s < 0))} are negative (min {float(s.min()):.4g}); "
            "use a non-negative score such as grad_norm"
        )

    if not balanced:
        picked = _pick(s, n_keep, strategy, np.random.default_rng(seed), sk)
        return np.sort(picked.astype(np.int64))

    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    quotas = class_quotas(counts, n_keep)
    parts = []
    for c_i, cls in enumerate(classes):
        members = np.flatnonzero(inverse == c_i)
        rng = np.random.default_rng([seed, int(cls)])
        local = _pick(s[members], int(quotas[c_i]), strategy, rng, sk)
        parts.append(members[local])
    return np.sort(np.concatenate(parts).astype(np.int64))


# --------------------------------------------------------------------------- summaries


def label_entropy(labels, num_classes: int) -> tuple[float, float]:
    """(entropy of the label distribution, entropy of the uniform one), both in nats.

    labels: int [N] in [0, num_classes). Empty labels -> entropy 0.0. Uniform = ln(num_classes).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise CleanError(f"num_classes must be an integer >= 1, got {_fmt(num_classes)}")
    y = _check_labels(labels)
    if y.size and y.max() >= num_classes:
        raise CleanError(f"labels must be in [0, {num_classes}), got max {int(y.max())}")
    counts = np.bincount(y, minlength=num_classes).astype(float)
    total = counts.sum()
    h = 0.0
    if total > 0:
        p = counts[counts > 0] / total
        h = float(-(p * np.log(p)).sum())
    return max(h, 0.0), float(math.log(num_classes))


def summary(labels_all, kept_idx, num_classes: int, class_names=None) -> dict:
    """Describe a kept subset; JSON-serialisable dict.

    labels_all: int [N] labels of the whole training set; kept_idx: int [n_kept] unique
    indices into it; class_names: list[str] [num_classes] or None (-> "0", "1", ...).
    Keys: n_total, n_kept, fraction_kept, kept_per_class {name: int},
    fraction_kept_per_class {name: float, None for a class with no samples},
    per_class [{class, name, n_total, n_kept, fraction_kept}],
    label_entropy {kept, all, uniform} (nats).
    """
    y = _check_labels(labels_all)
    n = y.size
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise CleanError(f"num_classes must be an integer >= 1, got {_fmt(num_classes)}")
    if n and y.max() >= num_classes:
        raise CleanError(f"labels must be in [0, {num_classes}), got max {int(y.max())}")
    names = [str(i) for i in range(num_classes)] if class_names is None else [str(c) for c in class_names]
    if len(names) != num_classes:
        raise CleanError(f"class_names has {len(names)} names but num_classes is {num_classes}")
    if len(set(names)) != len(names):
        raise CleanError("class_names must be unique")
    k = np.asarray(kept_idx)
    if k.ndim != 1:
        raise CleanError(f"kept_idx must be a 1-D array of indices, got shape {k.shape}")
    if k.size and (k.dtype.kind not in "iu" or k.min() < 0 or k.max() >= n):
        raise CleanError(f"kept_idx must be integer indices in [0, {n})")
    k = k.astype(np.int64)
    if np.unique(k).size != k.size:
        raise CleanError("kept_idx contains duplicate indices")

    all_counts = np.bincount(y, minlength=num_classes)
    kept_counts = np.bincount(y[k], minlength=num_classes)
    h_all, h_uni = label_entropy(y, num_classes)
    h_kept, _ = label_entropy(y[k], num_classes)
    per_class = []
    for c in range(num_classes):
        tot, kc = int(all_counts[c]), int(kept_counts[c])
        per_class.append(
            {"class": c, "name": names[c], "n_total": tot, "n_kept": kc,
             "fraction_kept": (kc / tot) if tot else None}
        )
    return {
        "n_total": int(n),
        "n_kept": int(k.size),
        "fraction_kept": (k.size / n) if n else None,
        "kept_per_class": {pc["name"]: pc["n_kept"] for pc in per_class},
        "fraction_kept_per_class": {pc["name"]: pc["fraction_kept"] for pc in per_class},
        "per_class": per_class,
        "label_entropy": {"kept": h_kept, "all": h_all, "uniform": h_uni},
    }
import pipeline.relabel  # noqa: E402,F401  (registers relabel, relabel-or-drop)
