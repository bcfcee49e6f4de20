"""Threshold rules on one score column: quantile, MAD (robust z-score), 2-component GMM.

Each takes a score oriented so that high = suspicious (margin, aum, confidence are negated:
pipeline/scores/order.py). Formulas: docs/methods.md §2.
"""
from __future__ import annotations

import math

import numpy as np

from pipeline.errors import CleanError
from pipeline.config import FlagConfig
from pipeline.registry import RULES
from pipeline.rules.base import FlagResult, _as_float, _check_open_unit, _fmt, _scores_1d

#: Consistency constant: 1.4826 * MAD estimates the std of a normal distribution.
MAD_SCALE = 1.4826
#: sqrt(pi/2): 1.2533 * mean absolute deviation estimates the std of a normal distribution.
MEANAD_SCALE = 1.2533


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


@RULES.register("quantile", needs=("score",), doc="the top flag.quantile of flag.score")
def quantile_rule(inputs, cfg: FlagConfig) -> FlagResult:
    values, name = inputs.score(cfg.score)
    return flag_quantile(values, cfg.quantile, name)


@RULES.register("mad", needs=("score",), doc="robust z-score of flag.score above flag.threshold")
def mad_rule(inputs, cfg: FlagConfig) -> FlagResult:
    values, name = inputs.score(cfg.score)
    return flag_mad(values, cfg.threshold, name)


@RULES.register("gmm", needs=("score",),
                doc="the high component of a 2-component Gaussian mixture on flag.score (no noise rate, no k-fold)")
def gmm_rule(inputs, cfg: FlagConfig) -> FlagResult:
    values, name = inputs.score(cfg.score)
    return flag_gmm(values, name, cfg.seed)
