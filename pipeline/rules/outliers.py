"""Outliers: an isolation forest on last-layer gradient vectors r ⊗ h (a flag rule), and the
kNN out-of-distribution issue type on penultimate embeddings.

Detrimental samples are outliers in gradient space (Chhabra et al. 2024, Outlier Gradient
Analysis); out-of-distribution images are far from their nearest training neighbours in
embedding space (kNN OOD score, as in cleanlab Datalab); formulas: docs/methods.md §2.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.images import load_images
from pipeline.errors import CleanError
from pipeline.config import FlagConfig
from pipeline.registry import ISSUES, RULES
from pipeline.rules import knn
from pipeline.rules.base import FlagResult, IssueResult, rows_for, _as_float, _check_seed, _float_array, _fmt
from pipeline.rules.threshold import MAD_SCALE


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


def gradient_features(model_dir: str | Path, manifest: str | Path, ids: np.ndarray, dim: int, seed: int,
                      device: str = "cpu", batch_size: int = 512) -> np.ndarray:
    """Last-layer gradient vectors vec(r ⊗ h) ⊕ r of the samples `ids` → [N, min(dim, C·(D+1))].

    Exact when C·(D+1) ≤ dim, else a seeded Gaussian random projection to `dim` (JL).
    """
    import torch

    from pipeline.head import forward_logits_features, grad_vectors_last, last_layer_residual, project_last_layer_grads
    from pipeline.training.infer import batches, normalize
    from pipeline.models import check_fits_data, load_trained

    model, cfg = load_trained(model_dir, device)
    check_fits_data(cfg, manifest, model_dir)
    rows = rows_for(manifest, ids, cfg["classes"])
    images = load_images(rows["path"].tolist(), Path(manifest).parent, tuple(cfg["image_size"]), cfg["in_chans"])
    labels = rows["label"].to_numpy(np.int64)
    out = []
    with torch.no_grad():
        for s, e in batches(len(ids), batch_size):
            logits, h = forward_logits_features(model, normalize(images[s:e], cfg["mean"], cfg["std"], device))
            y = torch.as_tensor(np.array(labels[s:e], np.int64), device=device)
            logits, h = logits.double(), h.double().reshape(len(y), -1)
            if logits.shape[1] * (h.shape[1] + 1) <= dim:
                out.append(grad_vectors_last(logits, h, y).cpu().numpy())
            else:
                out.append(project_last_layer_grads(last_layer_residual(logits, y), h, dim, seed).cpu().numpy())
    return np.concatenate(out)


@RULES.register("isolation-forest", needs=("model", "images", "forward"),
                doc="outliers of the (randomly projected) last-layer gradient vectors r⊗h")
def isolation_forest_rule(inputs, cfg: FlagConfig) -> FlagResult:
    inputs.require("isolation-forest", "model_dir", "manifest")
    feats = gradient_features(inputs.model_dir, inputs.manifest, inputs.ids, cfg.projection_dim, cfg.seed,
                              inputs.device)
    return flag_isolation_forest(feats, cfg.contamination, cfg.seed)


def knn_outliers(feats: dict, k: int = 10, c: float = 6.0, exact_max: int | None = None, seed: int = 0) -> IssueResult:
    """kNN out-of-distribution score of the training samples (feats: load_features' dict).

    score = mean cosine distance to the k nearest *training* embeddings (itself excluded;
    faiss search shared with the duplicate check, pipeline/rules/knn.py). Flagged when the
    score's robust z = (score − median) / (1.4826 · MAD) exceeds `c` (flag.outlier_mad).
    """

    pos = np.asarray(feats["train_pos"], np.int64)
    nn = knn.train_knn(feats, k, knn.EXACT_MAX if exact_max is None else exact_max, seed)
    d = nn["dist"][pos]
    d = np.where(np.isfinite(d), d, np.nan)
    with np.errstate(invalid="ignore"):
        score = np.nanmean(d, axis=1) if d.shape[1] else np.full(len(pos), np.nan)
    ok = np.isfinite(score)
    if ok.sum() < 2:
        return IssueResult(np.zeros(len(pos), bool), score.astype(np.float64),
                           "outlier: too few training samples, nothing flagged", summary={"n_flagged": 0})
    med = float(np.median(score[ok]))
    mad = float(np.median(np.abs(score[ok] - med)))
    scale = MAD_SCALE * mad if mad > 0 else 1.2533 * float(np.mean(np.abs(score[ok] - med)))
    thr = med + float(c) * scale if scale > 0 else np.inf
    flagged = ok & (score > thr)
    rule = f"mean cosine distance to {k} nearest training embeddings > median + {c:g}·1.4826·MAD ({thr:.4g})"
    summary = {"n_flagged": int(flagged.sum()), "k": int(k), "threshold": float(thr), "median": med,
               "mad": mad, "c": float(c), "index": nn["kind"]}
    return IssueResult(flagged=flagged, score=score.astype(np.float64), rule=rule, summary=summary)


@ISSUES.register("outlier", needs=("embeddings",),
                 doc="mean cosine distance to the flag.outlier_k nearest training embeddings above "
                     "median + flag.outlier_mad · MAD (kNN out-of-distribution score)")
def outlier(inputs, cfg: FlagConfig) -> IssueResult:
    return knn_outliers(inputs.features(), k=cfg.outlier_k, c=cfg.outlier_mad,
                        seed=cfg.seed)
