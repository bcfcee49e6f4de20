"""How well flags match a known truth (planted problems): AUROC, precision, recall."""
from __future__ import annotations

import numpy as np

from pipeline.errors import CleanError
from pipeline.rules.base import _float_array


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
