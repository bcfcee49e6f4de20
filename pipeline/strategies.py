"""Prune strategies (remedies): which training samples to keep. The STRATEGIES registry.

Every strategy is one function registered below (or in relabel.py), called the same way:
``fn(inputs: PruneInputs) -> PruneResult``. :class:`PruneInputs` hands it the labels, the
prune config and, on first use, the prune.by score values or the flags.csv rows;
:class:`PruneResult` says which samples are kept and with which label. :func:`select` keeps a
fraction ``keep`` of the training set by one of them (docs/methods.md §3), optionally
class-balanced; :func:`summary` and :func:`label_entropy` describe the kept set (kept per
class, label entropy: top-gradient selection skews the class mix).

Adding a strategy is one decorated function here::

    @STRATEGIES.register("min-loss", needs=("score",), doc="keep the smallest prune.by")
    def min_loss(inputs: PruneInputs) -> PruneResult:
        return keep_n(inputs, lambda scores, n, rng: np.argsort(scores, kind="stable")[:n])

Strategies (``prune.strategy``):

- ``random``        uniform without replacement: ``Generator(seed).choice(N, n_keep, replace=False)``.
- ``max-gradient``  the n_keep largest values of ``prune.by`` (any score column; grad_norm by
                    default); ties broken by index (lower index first).
- ``non-extreme``   sort descending (stable), skip the top round(skip*N), keep the next n_keep.
                    If fewer than n_keep remain after the skip, the shortfall is taken from the
                    skipped samples closest to the boundary (the lowest-scoring skipped ones),
                    i.e. the kept window is the n_keep consecutive ranks starting at
                    min(n_skip, N - n_keep).
- ``gradient-cdf``  sampling without replacement with P(i) proportional to the ``prune.by``
                    value g_i (successive sampling), implemented with the vectorised
                    Efraimidis–Spirakis exponential-keys method: key_i = E_i / g_i with E_i ~
                    Exp(1) i.i.d., keep the n_keep smallest keys. Values must be finite and >= 0.
                    Zero values have zero probability; only if fewer than n_keep are positive
                    are all positive ones kept and the rest drawn uniformly (without
                    replacement) from the zeros.
- ``drop-flagged``  drop the samples with any issue type of ``prune.drop`` (flags.csv
                    ``is_<type>``; ``flagged`` for a flags.csv without issue columns); ``keep``
                    (and ``balanced``, ``seed``, ``by``) have no effect. Keeping nothing is an error.
- ``drop-harmful``  drop the samples flags.csv marks ``is_harmful`` (removing them is predicted to lower
                    the validation loss, by every seed's model; before: val_influence < 0: a step on
                    them raises the validation loss); like drop-flagged otherwise.
- ``drop-flagged-harmful``  drop the samples that are both a label issue and harmful
                    (``is_label`` ∧ ``is_harmful``): hard but helpful flagged images stay.

``balanced=True`` applies the strategy within each class with quota n_keep_c proportional to
the class size (largest-remainder rounding, exact integer arithmetic, ties to the smaller class
id, so the quotas sum exactly to n_keep); the per-class random generator is seeded with
``numpy.random.default_rng([seed, class_id])``, and ``non-extreme`` skips round(skip*N_c)
within each class.

n_keep = round(keep*N) (Python's round: halves go to the even integer) clipped to [1, N].
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.checks import as_float as _as_float
from pipeline.checks import check_seed as _check_seed
from pipeline.checks import fmt as _fmt
from pipeline.config import PruneConfig
from pipeline.errors import CleanError
from pipeline.formats.tables import read_flags
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


# --------------------------------------------------------------------------- inputs and result


@dataclass(frozen=True)
class PruneResult:
    """What a strategy decides. kept: bool [N] (True = in the new dataset version); labels: int [N]
    the labels trained on (the given ones unless the strategy relabels); facts: summary.json
    entries saying which settings took effect (drop, by, keep, skip; None = not used)."""

    kept: np.ndarray
    labels: np.ndarray
    facts: dict = field(default_factory=dict)

    @property
    def positions(self) -> np.ndarray:
        """Sorted int64 indices of the kept samples."""
        return np.flatnonzero(self.kept).astype(np.int64)


class PruneInputs:
    """What a strategy may read, each part on first use (a strategy pays only for what it asks).

    labels: int [N] the training labels; config: the prune section (:class:`PruneConfig`).
    values: float [N] score values given directly (:func:`select`) — or `scores`, the scores.csv
    rows of the training samples (DataFrame, manifest order), whose column `config.by` is read.
    flagged: bool [N] the samples to drop given directly (:func:`select`) — or `flags_csv` with
    `ids` [N]: flags.csv, read in the same order.
    """

    def __init__(self, labels, config: PruneConfig, values=None, scores=None, scores_csv=None, flagged=None,
                 flags_csv=None, ids=None):
        self.labels, self.config = labels, config
        self._values, self._scores, self.scores_csv = values, scores, scores_csv
        self._flagged, self.flags_csv, self.ids = flagged, flags_csv, ids
        self._flags = None

    def __len__(self) -> int:
        return len(self.labels)

    def values(self) -> np.ndarray:
        """float [N]: the score that ranks or weights the samples (prune.by), all finite."""
        if self._values is not None:
            return self._values
        by, df, path = self.config.by, self._scores, self.scores_csv
        if by not in df.columns:
            raise CleanError(f"prune.by = {by!r} is not a column of {path}")
        v = df[by].to_numpy(np.float64)
        if np.isnan(v).all():
            raise CleanError(f"{path}: column '{by}' is empty (not computed); choose another prune.by "
                             "or rescore with it (e.g. score.self_influence: true)")
        bad = ~np.isfinite(v)
        if bad.any():
            raise CleanError(f"{path}: column '{by}' has {int(bad.sum())} missing/NaN/inf value(s) (first: id "
                             f"{int(self.ids[int(np.flatnonzero(bad)[0])])}); choose another prune.by or rescore")
        self._values = v
        return v

    def flags(self):
        """The flags.csv rows of the training samples (DataFrame, in `ids` order)."""
        if self._flags is None:
            name = self.config.strategy
            if self.flags_csv is None or not Path(self.flags_csv).exists():
                raise CleanError(f"prune.strategy = {name} needs flags ({self.flags_csv}); run `clean flag` first")
            self._flags = read_flags(self.flags_csv, self.ids).set_index("id").loc[self.ids]
        return self._flags

    def marked(self, types: list | tuple | None, every: bool = False) -> np.ndarray:
        """bool [N]: the samples with any (`every`: all) of the issue types `types` (flags.csv
        `is_<type>`). `types` None, or a flags.csv without issue columns (written by an older
        version), uses `flagged`. Given `flagged` (:func:`select`) is returned as it is."""
        if self._flagged is not None:
            return self._given_flags()
        if self._scores is None:  # select() without flagged
            raise CleanError(f"prune.strategy '{self.config.strategy}' needs the flag stage's output (flagged); "
                             "run `clean flag` first or choose another strategy")
        fl = self.flags()
        if types is None or (not every and not any(c.startswith("is_") for c in fl.columns)):
            return fl["flagged"].to_numpy().astype(bool)
        missing = [t for t in types if f"is_{t}" not in fl.columns]
        if missing and every:
            why = (" (the flag stage skips harmful when scores.csv has no importance: score with "
                   "score.importance: true and a val split)" if "harmful" in missing else "")
            raise CleanError(f"prune.strategy = {self.config.strategy} needs is_{missing[0]} in {self.flags_csv}, "
                             f"which has none{why}; re-run `clean flag` with that issue type")
        if missing:
            raise CleanError(f"prune.drop names issue type {missing[0]!r} but {self.flags_csv} has no is_{missing[0]} "
                             "column; add it to flag.issues and re-run `clean flag`, or remove it from prune.drop")
        cols = np.stack([fl[f"is_{t}"].to_numpy().astype(bool) for t in types]) if types else np.zeros((1, len(fl)), bool)
        return cols.all(0) if every else cols.any(0)

    def effects(self) -> np.ndarray | None:
        """float64 [M, N]: each seed model's predicted change of the mean validation loss (nats) when
        the sample is removed (scores/attribution.npz beside scores.csv; < 0: removing it helps);
        None when there is none (pipeline.effect.effects_of)."""
        from pipeline.effect import effects_of

        if self.scores_csv is None:
            return None
        return effects_of(Path(self.scores_csv).parent / "attribution.npz", self.ids)

    def _given_flags(self) -> np.ndarray:
        f = np.asarray(self._flagged)
        if f.shape != (len(self),):
            raise CleanError(f"flagged must be a 1-D array [N] with N = {len(self)}, got shape {f.shape}")
        if f.dtype.kind != "b":
            if not np.isin(f, (0, 1)).all():
                raise CleanError(f"flagged must be boolean (or 0/1), got dtype {f.dtype}")
            f = f.astype(bool)
        return f


# --------------------------------------------------------------------------- the two shapes of strategy


def _desc_order(scores: np.ndarray) -> np.ndarray:
    """Indices sorted by score descending; ties by index ascending."""
    return np.lexsort((np.arange(scores.size), -scores))


def keep_n(inputs: PruneInputs, pick: Callable, finite: bool = True, **facts) -> PruneResult:
    """Keep n_keep = round(prune.keep·N) samples chosen by `pick(values [n], n, rng) -> n local
    indices` — over the whole set, or per class with size-proportional quotas (prune.balanced;
    rng seeded [seed, class]). `finite`: the values must be finite (a ranking strategy)."""
    cfg = inputs.config
    s = inputs.values()
    n_keep = n_keep_for(cfg.keep, s.size)
    seed = _check_seed(cfg.seed)
    if finite:
        bad = int(np.count_nonzero(~np.isfinite(s)))
        if bad:
            raise CleanError(f"strategy '{cfg.strategy}' needs finite scores; {bad} are NaN/inf")
    kept = np.zeros(s.size, bool)
    if not cfg.balanced:
        kept[pick(s, n_keep, np.random.default_rng(seed))] = True
    else:
        classes, inverse, counts = np.unique(inputs.labels, return_inverse=True, return_counts=True)
        quotas = class_quotas(counts, n_keep)
        for c_i, cls in enumerate(classes):
            members = np.flatnonzero(inverse == c_i)
            if quotas[c_i] > 0:
                kept[members[pick(s[members], int(quotas[c_i]), np.random.default_rng([seed, int(cls)]))]] = True
    return PruneResult(kept, np.asarray(inputs.labels, np.int64),
                       {"drop": None, "by": cfg.by, "keep": cfg.keep, "skip": None, **facts})


def drop_marked(inputs: PruneInputs, types, what: str, every: bool = False, marked=None, **facts) -> PruneResult:
    """Drop the samples marked with the issue types `types` (any; `every`: all of them), or the
    bool [N] mask `marked` when given; keeping nothing is an error naming `what` they all are."""
    cfg = inputs.config
    marked = inputs.marked(types, every) if marked is None else marked
    if marked.all():
        raise CleanError(f"{cfg.strategy} would keep 0 of {marked.shape[0]} samples: every sample is {what}")
    return PruneResult(~marked, np.asarray(inputs.labels, np.int64),
                       {"drop": None if cfg.drop is None else list(cfg.drop), "by": None, "keep": None, "skip": None,
                        **facts})


def other_drop_types(inputs: PruneInputs) -> np.ndarray:
    """bool [N]: samples with the issue types of prune.drop other than `label`."""
    drop = inputs.config.drop
    if not drop:
        return np.zeros(len(inputs), bool)
    return inputs.marked([t for t in drop if t != "label"])


# --------------------------------------------------------------------------- strategies


@STRATEGIES.register("random", doc="uniform without replacement (the baseline)")
def random_subset(inputs: PruneInputs) -> PruneResult:
    """n_keep indices drawn uniformly without replacement."""
    return keep_n(inputs, lambda s, n, rng: rng.choice(s.size, size=n, replace=False), finite=False)


@STRATEGIES.register("max-gradient", needs=("score",), doc="keep the largest prune.by (any score column)")
def max_gradient(inputs: PruneInputs) -> PruneResult:
    """The n_keep largest values of prune.by; ties by index."""
    return keep_n(inputs, lambda s, n, rng: _desc_order(s)[:n])


@STRATEGIES.register("non-extreme", needs=("score",), doc="skip the top prune.skip of prune.by, then keep the largest")
def non_extreme(inputs: PruneInputs) -> PruneResult:
    """Sort descending, skip the top round(skip·N), keep the next n (window shifted up if short)."""
    n_keep_for(inputs.config.keep, len(inputs)), _check_seed(inputs.config.seed)  # checked in keep_n's order
    skip = _as_float(inputs.config.skip, "prune.skip")
    if not (0.0 <= skip < 1.0):
        raise CleanError(f"prune.skip must be in [0, 1), got {_fmt(inputs.config.skip)}")

    def window(s, n, rng):
        start = min(int(round(skip * s.size)), s.size - n)
        return _desc_order(s)[start : start + n]

    return keep_n(inputs, window, skip=inputs.config.skip)


@STRATEGIES.register("gradient-cdf", needs=("score",), doc="sample ∝ prune.by (any score ≥ 0), without replacement")
def gradient_cdf(inputs: PruneInputs) -> PruneResult:
    """Successive sampling with P(i) ∝ g_i (Efraimidis–Spirakis keys E_i / g_i); zeros last."""
    s = inputs.values()
    if np.isfinite(s).all() and (s < 0).any():
        raise CleanError(
            f"strategy 'gradient-cdf' needs scores >= 0 (sampling weights); "
            f"{int(np.count_nonzero(s < 0))} are negative (min {float(s.min()):.4g}); "
            "use a non-negative score such as grad_norm"
        )

    def draw(g, n, rng):
        pos = np.flatnonzero(g > 0)
        if pos.size >= n:
            keys = rng.standard_exponential(pos.size) / g[pos]
            return pos[np.argsort(keys, kind="stable")[:n]]
        fill = rng.choice(np.flatnonzero(g <= 0), size=n - pos.size, replace=False)
        return np.concatenate([pos, fill])

    return keep_n(inputs, draw)


@STRATEGIES.register("drop-flagged", needs=("flags",),
                     doc="drop the images with an issue type of prune.drop (flags.csv is_<type>)")
def drop_flagged(inputs: PruneInputs) -> PruneResult:
    """Keep the samples with none of the issue types of prune.drop."""
    return drop_marked(inputs, inputs.config.drop, "flagged")


@STRATEGIES.register("drop-flagged-gated", needs=("flags",),
                     doc="drop-flagged, but a label issue only where every seed's model predicts that removing it "
                         "lowers the validation loss (scores/attribution.npz)")
def drop_flagged_gated(inputs: PruneInputs) -> PruneResult:
    """Drop the samples with the prune.drop types other than `label`, and the label issues whose
    removal effect (importance, nats) is < 0 for every seed's model: a flagged image the models
    need (a hard, correctly labelled one, by their estimate) is kept (docs/methods.md §3). Without
    effects (score.importance false, no val split) every label issue is dropped, as drop-flagged
    does, and the summary's `label_gate` says so."""
    marked, gate = other_drop_types(inputs), None
    if "label" in (inputs.config.drop or []):
        lab = inputs.marked(["label"])
        effects = inputs.effects()
        harm = np.ones(len(inputs), bool) if effects is None else (effects < 0).all(0)
        gate = {"label_issues": int(lab.sum()), "dropped": int((lab & harm).sum()), "kept": int((lab & ~harm).sum()),
                "rule": "every seed model's removal effect < 0" if effects is not None else
                "off, every label issue dropped: no removal effects in scores/attribution.npz (run `clean score` "
                "with score.importance: true and a val split)"}
        marked = marked | (lab & harm)
    return drop_marked(inputs, None, "flagged", marked=marked, label_gate=gate)


@STRATEGIES.register("drop-harmful", needs=("flags",),
                     doc="drop the images flags.csv marks is_harmful (removal predicted to lower the val loss)")
def drop_harmful(inputs: PruneInputs) -> PruneResult:
    """Keep the samples that are not harmful (is_harmful)."""
    return drop_marked(inputs, ("harmful",), "harmful", every=True)


@STRATEGIES.register("drop-flagged-harmful", needs=("flags",),
                     doc="drop the images that are both a label issue and harmful")
def drop_flagged_harmful(inputs: PruneInputs) -> PruneResult:
    """Keep the samples that are not both a label issue and harmful (is_label ∧ is_harmful)."""
    return drop_marked(inputs, ("label", "harmful"), "both a label issue and harmful", every=True)


def select(scores, labels, strategy: str, keep: float, seed: int, balanced: bool = False, skip: float = 0.05,
           flagged=None) -> np.ndarray:
    """Choose the samples to keep; returns their SORTED indices, int64 [n_kept].

    scores: float [N] importance scores (e.g. grad_norm); labels: int [N] class ids;
    strategy: one of :data:`STRATEGIES`; keep in (0, 1] (n_keep = round(keep*N) in [1, N]);
    seed: int >= 0; balanced: select per class with size-proportional quotas;
    skip in [0, 1): top fraction skipped by ``non-extreme``;
    flagged: bool [N], the samples a flags-reading strategy drops (True = drop).
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
    if s.size == 0:
        raise CleanError("nothing to select from: the score vector is empty")
    y = _check_labels(labels, s.size)
    config = PruneConfig(strategy=strategy, keep=keep, seed=seed, balanced=balanced, skip=skip)
    return STRATEGIES[strategy].fn(PruneInputs(y, config, values=s, flagged=flagged)).positions


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
