"""Confident learning (cleanlab) on out-of-sample probabilities from k-fold cross-fitting.

In-sample probabilities are biased toward the given labels, so `confident` trains
`flag.folds` extra models (pipeline/training/crossfit.py). Formulas: docs/methods.md §2.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.images import load_images
from pipeline.errors import CleanError
from pipeline.config import FlagConfig
from pipeline.formats.manifest import classes_path_for, read_classes
from pipeline.params import CONFIDENT_FILTERS, NOISE_POSTERIOR  # noqa: F401 (re-exported)
from pipeline.registry import RULES
from pipeline.rules.base import FlagResult, rows_for, _float_array, _fmt, _labels_1d

#: Tolerance on |sum_c p_ic - 1| for predicted probabilities (float32 softmax is well within it).
PROB_SUM_ATOL = 1e-3


def flag_confident(pred_probs, labels, filter_by: str = "prune_by_noise_rate", noise_matrix=None) -> FlagResult:
    """Confident learning (cleanlab) on OUT-OF-SAMPLE predicted probabilities.

    pred_probs: float [N, C] (C >= 2), rows in [0, 1] summing to 1 (atol 1e-3), from k-fold
    cross-fitting (in-sample probabilities are biased toward the given labels).
    labels: int [N] in [0, C).
    flagged = cleanlab.filter.find_label_issues(labels, pred_probs, filter_by=filter_by);
    value = 1 - cleanlab.rank.get_label_quality_scores(labels, pred_probs) (self-confidence),
    i.e. higher = more likely mislabeled. rule e.g. ``"confident-learning prune_by_noise_rate"``.
    filter_by "noise_posterior": :func:`noise_posterior` instead (value = P(label wrong), with
    `noise_matrix` [C, C] when given, else estimated from these probabilities).
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
    if filter_by == NOISE_POSTERIOR:
        return noise_posterior(p, y, noise_matrix)

    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    flagged = find_label_issues(y, p, filter_by=filter_by, n_jobs=1)
    quality = get_label_quality_scores(y, p)
    return FlagResult(
        flagged=np.asarray(flagged, dtype=bool),
        value=1.0 - np.asarray(quality, dtype=float),
        rule=f"confident-learning {filter_by}",
    )


def estimate_noise_matrix(pred_probs, labels) -> np.ndarray:
    """The annotators' noise matrix T [C, C], T[i, j] = P(given label i | true label j) (columns sum
    to 1), estimated by cleanlab's confident joint (``estimate_py_and_noise_matrices_from_probabilities``)
    from out-of-sample probabilities [N, C] and the given labels [N]."""
    from cleanlab.count import estimate_py_and_noise_matrices_from_probabilities

    _, nm, _, _ = estimate_py_and_noise_matrices_from_probabilities(np.asarray(labels, np.int64),
                                                                    np.asarray(pred_probs, np.float64))
    return np.asarray(nm, np.float64)


def clean_posterior(pred_probs, noise_matrix) -> np.ndarray:
    """The true-label posterior behind a noisy-label model's probabilities: a model trained on labels
    that pass through T predicts p̃ = T · p (p̃_i = Σ_j T[i, j] p_j), so p = T⁻¹ p̃, clipped at 0 and
    renormalised (pred_probs p̃ [N, C], noise_matrix T [C, C] as :func:`estimate_noise_matrix`;
    pseudo-inverse when T is singular) → float64 [N, C]. A row that clips to nothing keeps p̃."""
    p = np.asarray(pred_probs, np.float64)
    q = np.clip(p @ np.linalg.pinv(np.asarray(noise_matrix, np.float64)).T, 0.0, None)
    tot = q.sum(1, keepdims=True)
    return np.where(tot > 1e-12, q / np.maximum(tot, 1e-12), p)


def wrong_label_posterior(pred_probs, labels, noise_matrix, noisy: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Bayes posterior of each sample's true label given its image and its given label:
    q_j ∝ T[given, j] · p_j, p = :func:`clean_posterior` of pred_probs [N, C] (a noisy-label model's
    probabilities; `noisy` False: pred_probs already are a true-label posterior, taken as p), T [C, C] as
    :func:`estimate_noise_matrix` → (P(true ≠ given) float [N] in 0..1, the most likely true label int [N]).
    A disagreement between classes the annotators do not confuse (T[given, j] ≈ 0) barely counts; one
    along a confused pair does."""
    t = np.asarray(noise_matrix, np.float64)
    y = np.asarray(labels, np.int64)
    joint = (clean_posterior(pred_probs, t) if noisy else np.asarray(pred_probs, np.float64)) * t[y, :]
    q = joint / np.maximum(joint.sum(1, keepdims=True), 1e-300)
    return np.clip(1.0 - q[np.arange(len(y)), y], 0.0, 1.0), q.argmax(1).astype(np.int64)


def noise_posterior(pred_probs, labels, noise_matrix=None) -> FlagResult:
    """Label issues by the posterior under the estimated noise matrix (flag.filter_by /
    flag.heldout_filter_by ``noise_posterior``; docs/methods.md §2.4).

    pred_probs: float [N, C] out-of-sample probabilities; labels: int [N]; noise_matrix: T [C, C]
    (:func:`estimate_noise_matrix`; estimated from these probabilities when None).
    value = P(true ≠ given) of :func:`wrong_label_posterior`; flagged = value > 0.5 (Bayes' decision:
    the given label is more likely wrong than right).
    """
    y = np.asarray(labels, np.int64)
    t = estimate_noise_matrix(pred_probs, y) if noise_matrix is None else np.asarray(noise_matrix, np.float64)
    c = np.asarray(pred_probs).shape[1]
    if t.shape != (c, c):
        raise CleanError(f"noise_matrix must be a [{c}, {c}] array, got shape {t.shape}")
    if not np.isfinite(t).all():
        raise CleanError("the noise matrix for flag.filter_by / heldout_filter_by noise_posterior is not finite "
                         "(a class with too few images to estimate it?); use prune_by_class / prune_by_noise_rate")
    value, _ = wrong_label_posterior(pred_probs, y, t)
    return FlagResult(flagged=value > 0.5, value=value, rule="noise posterior: P(label wrong) > 0.5")


def _crossfit_probs(manifest, ids, recipe, folds, seed, progress):
    from pipeline.training.crossfit import out_of_sample_probs
    from pipeline.data.dataset import image_size_of

    classes = read_classes(classes_path_for(manifest))["classes"]
    rows = rows_for(manifest, ids, classes)
    images = load_images(rows["path"].tolist(), Path(manifest).parent, image_size_of(recipe.image_size))
    return out_of_sample_probs(images, rows["label"].to_numpy(np.int64), len(classes), recipe, folds, seed, progress)


@RULES.register("confident", needs=("training", "images"),
                doc="cleanlab's confident learning on k-fold out-of-sample probabilities (flag.folds extra trainings)")
def confident_rule(inputs, cfg: FlagConfig) -> FlagResult:
    inputs.require("confident", "manifest", "recipe")
    probs = _crossfit_probs(inputs.manifest, inputs.ids, inputs.recipe, cfg.folds, cfg.seed, inputs.progress)
    return flag_confident(probs, inputs.labels)


@RULES.register("confident-dynamics", needs=("probs", "dynamics"),
                doc="confident learning (cleanlab) on the early-epoch, seed-averaged pre-update softmax, "
                    "with AUM below flag.aum_max: no k-fold, adapts to the noise rate")
def confident_dynamics_rule(inputs, cfg: FlagConfig) -> FlagResult:
    """Label issues without extra training (docs/methods.md §2.1): p̄ = mean over the first
    train.probs_window of the epochs (and over seeds) of each sample's train-mode softmax taken
    before its update — predictions made before the model memorised the sample; flagged =
    cleanlab's find_label_issues(labels, p̄, flag.filter_by) ∧ AUM < flag.aum_max (a sample the
    model never came to fit under its given label) ∧ max p̄ ≥ flag.label_min_p (when > 0). value = 1 − label quality of p̄, in 0..1."""
    res = flag_confident(inputs.probs(), inputs.labels, filter_by=cfg.filter_by)
    rule = f"confident-dynamics {cfg.filter_by}"
    flagged = res.flagged
    if cfg.aum_max is not None:
        aum, _ = inputs.score("aum")
        flagged = flagged & (-aum < cfg.aum_max)  # inputs.score orients aum: high = suspicious
        rule += f" ∧ aum < {cfg.aum_max:g}"
    if cfg.label_min_p > 0:  # precision first: only where the suggestion itself is confident
        flagged = flagged & (inputs.probs().max(1) >= cfg.label_min_p)
        rule += f" ∧ p̄ ≥ {cfg.label_min_p:g}"
    return FlagResult(flagged, res.value, rule)
