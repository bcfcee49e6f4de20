"""Flag rules (the `flag` stage): which training samples look suspicious, and why.

Pure functions on numpy arrays; no I/O, no torch. Every rule returns a :class:`FlagResult`
holding the per-sample decision, the score behind it and a human-readable rule string, so a
flag always says which rule fired and on what value (METHODS.md §2).

Rules:
- :func:`flag_quantile`         top q fraction of a score.
- :func:`flag_mad`              robust z-score (median / MAD) above a threshold, one-sided.
- :func:`flag_isolation_forest` isolation forest on per-sample (projected) gradient vectors.
- :func:`flag_confident`        confident learning (cleanlab) on out-of-sample probabilities.

Benchmark helpers: :func:`auroc`, :func:`precision_recall`.

Parameter errors raise :class:`~pipeline.errors.CleanError` naming the params.yaml key
(``flag.quantile``, ``flag.threshold``, ``flag.contamination``, ...).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.errors import CleanError

#: Consistency constant: 1.4826 * MAD estimates the std of a normal distribution.
MAD_SCALE = 1.4826
#: sqrt(pi/2): 1.2533 * mean absolute deviation estimates the std of a normal distribution.
MEANAD_SCALE = 1.2533

#: filter_by values accepted by cleanlab.filter.find_label_issues.
CONFIDENT_FILTERS = (
    "prune_by_noise_rate",
    "prune_by_class",
    "both",
    "confident_learning",
    "predicted_neq_given",
    "low_normalized_margin",
    "low_self_confidence",
)

#: Tolerance on |sum_c p_ic - 1| for predicted probabilities (float32 softmax is well within it).
PROB_SUM_ATOL = 1e-3


@dataclass(frozen=True)
class FlagResult:
    """Outcome of one flag rule.

    flagged: bool [N]   True = flagged by the rule.
    value:   float [N]  the score the rule thresholds (higher = more suspicious).
    rule:    str        human-readable rule, e.g. ``"loss >= q0.95 (2.31)"``.
    """

    flagged: np.ndarray
    value: np.ndarray
    rule: str

    @property
    def n_flagged(self) -> int:
        """Number of flagged samples."""
        return int(np.count_nonzero(self.flagged))


# --------------------------------------------------------------------------- validation


def _fmt(x) -> str:
    """Short repr of a user-supplied param for error messages."""
    return repr(x) if isinstance(x, str) else f"{x}"


def _as_float(x, name: str) -> float:
    if isinstance(x, bool):
        raise CleanError(f"{name} must be a number, got {_fmt(x)}")
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise CleanError(f"{name} must be a number, got {_fmt(x)}") from None
    return v


def _check_open_unit(x, name: str) -> float:
    """x in (0, 1), else CleanError ``"<name> must be in (0, 1), got <x>"``."""
    v = _as_float(x, name)
    if not (0.0 < v < 1.0):  # also rejects NaN
        raise CleanError(f"{name} must be in (0, 1), got {_fmt(x)}")
    return v


def _float_array(x, what: str) -> np.ndarray:
    """np.asarray(x, float) with a CleanError instead of a numpy traceback."""
    try:
        return np.asarray(x, dtype=float)
    except (TypeError, ValueError):
        raise CleanError(f"{what} must be a numeric array") from None


def _scores_1d(values, score_name: str) -> np.ndarray:
    """Validate a per-sample score vector: 1-D, non-empty, finite."""
    v = _float_array(values, f"score '{score_name}'")
    if v.ndim != 1:
        raise CleanError(f"score '{score_name}' must be a 1-D array [N], got shape {v.shape}")
    if v.size == 0:
        raise CleanError(f"score '{score_name}' is empty: nothing to flag")
    bad = int(np.count_nonzero(~np.isfinite(v)))
    if bad:
        raise CleanError(
            f"score '{score_name}' has {bad} non-finite value(s) (NaN/inf); "
            "re-run the score stage or choose another score"
        )
    return v


# --------------------------------------------------------------------------- rules


def flag_quantile(values, q: float, score_name: str) -> FlagResult:
    """Flag the top ``q`` fraction of a score.

    values: float [N] (finite); q in (0, 1).
    The threshold t is the k-th largest value with k = ceil(q*N) (at least 1), and every
    sample with value >= t is flagged. Without ties exactly k samples are flagged; samples
    tied with the k-th largest are all flagged (deterministic, order-independent).
    value = the score itself; rule e.g. ``"loss >= q0.95 (2.31)"``.
    """
    q = _check_open_unit(q, "flag.quantile")
    v = _scores_1d(values, score_name)
    n = v.size
    # small epsilon so that e.g. 0.07 * 100 = 7.000000000000001 gives 7, not 8
    k = min(n, max(1, math.ceil(q * n - 1e-9)))
    thr = float(np.sort(v)[n - k])  # k-th largest
    flagged = v >= thr
    return FlagResult(
        flagged=flagged,
        value=v.copy(),
        rule=f"{score_name} >= q{round(1.0 - q, 6):g} ({thr:.4g})",
    )


def flag_mad(values, threshold: float, score_name: str) -> FlagResult:
    """Flag high robust z-scores: z = (x - median) / (1.4826 * MAD) > threshold.

    values: float [N] (finite); threshold > 0. One-sided: only high scores are flagged.
    If MAD == 0 (more than half the values identical) the scale falls back to
    1.2533 * mean absolute deviation from the median; if that is 0 too (all values equal)
    z is all zeros and nothing is flagged.
    value = z; rule e.g. ``"mad z(grad_norm) > 3.5"`` (``"meanad z(...)"`` for the fallback).
    """
    thr = _as_float(threshold, "flag.threshold")
    if not (thr > 0.0 and math.isfinite(thr)):
        raise CleanError(f"flag.threshold must be a finite number > 0, got {_fmt(threshold)}")
    v = _scores_1d(values, score_name)
    med = float(np.median(v))
    dev = np.abs(v - med)
    mad = float(np.median(dev))
    kind = "mad"
    scale = MAD_SCALE * mad
    if scale == 0.0:
        kind = "meanad"
        scale = MEANAD_SCALE * float(np.mean(dev))
    if scale == 0.0:
        z = np.zeros_like(v)
        rule = f"mad z({score_name}) > {thr:g} (all values equal: nothing flagged)"
    else:
        z = (v - med) / scale
        rule = f"{kind} z({score_name}) > {thr:g}"
    return FlagResult(flagged=z > thr, value=z, rule=rule)


def flag_gmm(values, score_name: str, seed: int = 0) -> FlagResult:
    """Flag the high component of a 2-component Gaussian mixture fitted to a score.

    values: float [N] (finite), oriented so that high = suspicious. Unsupervised noise
    modelling on per-sample losses (Arazo et al. 2019; DivideMix): no noise rate to know,
    no k-fold retraining. value = posterior p(high component | x) in [0, 1]; a sample is
    flagged when that posterior > 0.5 and it lies above the low component's mean (so the
    far low tail of a narrow high component is never flagged).
    """
    from sklearn.mixture import GaussianMixture

    v = _scores_1d(values, score_name)
    if v.size < 4 or float(np.ptp(v)) == 0.0:
        return FlagResult(np.zeros(v.size, bool), np.zeros(v.size), f"gmm({score_name}): too few distinct values, nothing flagged")
    x = v[:, None]
    gm = GaussianMixture(2, random_state=seed, reg_covar=1e-6 * float(np.var(v)) + 1e-12, n_init=2).fit(x)
    means = gm.means_[:, 0]
    hi, lo = int(np.argmax(means)), int(np.argmin(means))
    post = gm.predict_proba(x)[:, hi]
    flagged = (post > 0.5) & (v > means[lo])
    rule = (f"gmm p(high {score_name}) > 0.5 (component means {means[lo]:.3g} / {means[hi]:.3g}, "
            f"high weight {gm.weights_[hi]:.2f})")
    return FlagResult(flagged=flagged, value=post, rule=rule)


def flag_isolation_forest(
    features, contamination: float, seed: int, n_estimators: int = 100
) -> FlagResult:
    """Isolation forest on per-sample feature vectors (projected last-layer gradients).

    features: float [N, k] (finite, N >= 2); contamination in (0, 0.5]; seed: int >= 0.
    Uses sklearn IsolationForest(random_state=seed, n_jobs=1).
    value = -score_samples (higher = more anomalous); flagged = predict == -1.
    """
    c = _as_float(contamination, "flag.contamination")
    if not (0.0 < c <= 0.5):
        raise CleanError(f"flag.contamination must be in (0, 0.5], got {_fmt(contamination)}")
    if isinstance(n_estimators, bool) or not isinstance(n_estimators, (int, np.integer)) or n_estimators < 1:
        raise CleanError(f"flag.n_estimators must be an integer >= 1, got {_fmt(n_estimators)}")
    seed = _check_seed(seed)
    x = _float_array(features, "isolation-forest features")
    if x.ndim != 2:
        raise CleanError(f"isolation-forest features must be a 2-D array [N, k], got shape {x.shape}")
    if x.shape[0] < 2 or x.shape[1] < 1:
        raise CleanError(
            f"isolation-forest needs at least 2 samples and 1 feature, got shape {x.shape}"
        )
    bad = int(np.count_nonzero(~np.isfinite(x).all(axis=1)))
    if bad:
        raise CleanError(f"isolation-forest features have {bad} row(s) with NaN/inf values")

    from sklearn.ensemble import IsolationForest

    forest = IsolationForest(
        n_estimators=int(n_estimators), contamination=c, random_state=seed, n_jobs=1
    )
    forest.fit(x)
    value = -forest.score_samples(x)
    flagged = forest.predict(x) == -1
    return FlagResult(
        flagged=np.asarray(flagged, dtype=bool),
        value=np.asarray(value, dtype=float),
        rule=f"isolation-forest contamination={c:g}",
    )


def flag_confident(pred_probs, labels, filter_by: str = "prune_by_noise_rate") -> FlagResult:
    """Confident learning (cleanlab) on OUT-OF-SAMPLE predicted probabilities.

    pred_probs: float [N, C] (C >= 2), rows in [0, 1] summing to 1 (atol 1e-3), from k-fold
    cross-fitting (in-sample probabilities are biased toward the given labels).
    labels: int [N] in [0, C).
    flagged = cleanlab.filter.find_label_issues(labels, pred_probs, filter_by=filter_by);
    value = 1 - cleanlab.rank.get_label_quality_scores(labels, pred_probs) (self-confidence),
    i.e. higher = more likely mislabeled. rule e.g. ``"confident-learning prune_by_noise_rate"``.
    """
    if filter_by not in CONFIDENT_FILTERS:
        raise CleanError(
            f"flag.filter_by must be one of: {', '.join(CONFIDENT_FILTERS)}; got {_fmt(filter_by)}"
        )
    p = _float_array(pred_probs, "pred_probs")
    if p.ndim != 2 or p.shape[1] < 2:
        raise CleanError(f"pred_probs must be a 2-D array [N, C] with C >= 2, got shape {p.shape}")
    n, n_classes = p.shape
    if n == 0:
        raise CleanError("pred_probs is empty: nothing to flag")
    y = _labels_1d(labels, n, n_classes)
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise CleanError("pred_probs must be finite probabilities in [0, 1]")
    sums = p.sum(axis=1)
    off = np.flatnonzero(np.abs(sums - 1.0) > PROB_SUM_ATOL)
    if off.size:
        i = int(off[0])
        raise CleanError(
            f"pred_probs rows must sum to 1 (tolerance {PROB_SUM_ATOL:g}): {off.size} row(s) "
            f"do not, e.g. row {i} sums to {sums[i]:.6g}; pass softmax probabilities, not logits"
        )
    # A class missing from labels is allowed: cleanlab warns and flags nothing for it.

    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    flagged = find_label_issues(y, p, filter_by=filter_by, n_jobs=1)
    quality = get_label_quality_scores(y, p)
    return FlagResult(
        flagged=np.asarray(flagged, dtype=bool),
        value=1.0 - np.asarray(quality, dtype=float),
        rule=f"confident-learning {filter_by}",
    )


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CleanError(f"seed must be a non-negative integer, got {_fmt(seed)}")
    return int(seed)


def _labels_1d(labels, n: int, n_classes: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n,):
        raise CleanError(f"labels must be a 1-D array [N] with N = {n}, got shape {y.shape}")
    if y.dtype.kind not in "iu":
        if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():
            y = y.astype(np.int64)
        else:
            raise CleanError(f"labels must be integer class ids, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if n and (y.min() < 0 or y.max() >= n_classes):
        raise CleanError(
            f"labels must be in [0, {n_classes}) to match pred_probs' {n_classes} columns, "
            f"got range [{int(y.min())}, {int(y.max())}]"
        )
    return y


# --------------------------------------------------------------------------- benchmarks


def _truth_1d(truth, n: int) -> np.ndarray:
    t = np.asarray(truth)
    if t.shape != (n,):
        raise CleanError(f"truth must be a 1-D array [N] with N = {n}, got shape {t.shape}")
    return t.astype(bool)


def auroc(values, truth) -> float:
    """Area under the ROC curve of score ``values`` [N] for binary ``truth`` [N] (bool).

    Uses sklearn.metrics.roc_auc_score. Raises CleanError when truth has only one class
    (AUROC is undefined) or values are not finite.
    """
    v = _float_array(values, "values")
    if v.ndim != 1:
        raise CleanError(f"values must be a 1-D array [N], got shape {v.shape}")
    t = _truth_1d(truth, v.size)
    if not np.isfinite(v).all():
        raise CleanError("auroc: values contain NaN/inf")
    n_pos = int(t.sum())
    if n_pos == 0 or n_pos == t.size:
        raise CleanError("auroc is undefined: truth must contain both positives and negatives")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(t, v))


def precision_recall(flagged, truth) -> tuple[float, float]:
    """(precision, recall) of bool ``flagged`` [N] against bool ``truth`` [N].

    precision = TP / #flagged (0.0 when nothing is flagged);
    recall = TP / #truth (0.0 when truth has no positives).
    """
    f = np.asarray(flagged).astype(bool)
    if f.ndim != 1:
        raise CleanError(f"flagged must be a 1-D array [N], got shape {f.shape}")
    t = _truth_1d(truth, f.size)
    tp = int(np.count_nonzero(f & t))
    n_flag = int(np.count_nonzero(f))
    n_true = int(np.count_nonzero(t))
    precision = tp / n_flag if n_flag else 0.0
    recall = tp / n_true if n_true else 0.0
    return float(precision), float(recall)
