"""Outliers: an isolation forest on last-layer gradient vectors r ⊗ h (a flag rule), and the
kNN out-of-distribution issue type on penultimate embeddings.

Detrimental samples are outliers in gradient space (Chhabra et al. 2024, Outlier Gradient
Analysis); out-of-distribution images are far from their nearest training neighbours in
embedding space (kNN OOD score, as in cleanlab Datalab); formulas: docs/methods.md §2.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import CleanError
from pipeline.config import FlagConfig
from pipeline.registry import ISSUES, RULES
from pipeline.rules.base import FlagResult, IssueResult, rows_for, _as_float, _check_seed, _float_array, _fmt


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
    from pipeline.data.images import load_images
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


#: fewest val images for the reference cut (fewer: the robust-z fallback on the training scores)
MIN_REFERENCE = 50
#: probability of the interval stated for the rate of unseen images beyond the val cut (:func:`rate_interval`)
RATE_LEVEL = 0.9


def rate_interval(n: int, fpr: float, level: float = RATE_LEVEL) -> tuple[float, float]:
    """Where the true fraction of new images beyond the (1 − fpr) quantile of n reference images lies, with
    probability `level` → (lo, hi) fractions. The cut is (between) the j-th smallest of n exchangeable draws; the
    fraction of the population above the j-th order statistic is Beta(n − j + 1, j) for any continuous
    distribution (Wilks 1941). np.quantile interpolates between j = ⌊h⌋ + 1 and ⌈h⌉ + 1, h = (n − 1)(1 − fpr):
    the upper end takes the lower order statistic, the lower end the higher (180 val images, fpr 0.01:
    0.2 %–3.5 %; the stated 1 % is the average, one val split's cut can be off by that much)."""
    from scipy.special import betaincinv  # the Beta quantile (scipy.stats costs 0.6 s to import, this 0.2 s)

    h = (int(n) - 1) * (1.0 - float(fpr))
    j_lo, j_hi = int(np.floor(h)) + 1, int(np.ceil(h)) + 1
    tail = (1.0 - float(level)) / 2.0
    return float(betaincinv(n - j_hi + 1, j_hi, tail)), float(betaincinv(n - j_lo + 1, j_lo, 1.0 - tail))


def knn_outliers(feats: dict, k: int = 10, c: float = 6.0, exact_max: int | None = None, seed: int = 0,
                 fpr: float = 0.01) -> IssueResult:
    """kNN out-of-distribution score of the training samples (feats: load_features' dict).

    score = cosine distance (L2-normalised embeddings) to the k-th nearest *training* embedding
    (itself excluded; Sun et al. 2022; faiss search shared with the duplicate check), averaged over
    the seed models whose embeddings embeddings.npz holds ("emb", "emb_1", …: `clean score` with
    score.seed_embeddings). One model's distance ranks the out-of-set images differently from seed
    to seed; the mean over the seeds ranks them better (docs/benchmarks.md, issue 22). The cut
    is the (1 − fpr) quantile of the same score of the **val** images (held out, searched
    against the same training index): a training image is flagged when it is farther from the
    training set than all but a fraction `fpr` of held-out images of the user's own data. The
    rate holds for val images; training images need not match it (clean digits: 1.7 % with three seeds, 2.8 % with one, of the
    training set beyond the 99 % val cut — their kNN distances are not exchangeable with val's). With fewer than MIN_REFERENCE val images:
    robust z = (score − median) / (1.4826 · MAD) > `c` (flag.outlier_mad) on the training scores.
    Columns: outlier_neighbour = the id of the nearest training image (the scored model's embedding).
    """
    from pipeline.rules import knn

    pos = np.asarray(feats["train_pos"], np.int64)
    em = knn.EXACT_MAX if exact_max is None else exact_max
    keys = knn.embedding_keys(feats)
    nn = knn.train_knn(feats, k, em, seed)
    kth = _kth(nn["dist"], k)
    # the other seed models: the k-th distance of the training and val rows only (the test rows' is never used)
    split = np.asarray(feats["split"]).astype(str) if "split" in feats else None
    asked = None if split is None else np.isin(split, ("train", "val"))
    for key in keys[1:]:
        kth += _kth(knn.train_knn(feats, k, em, seed, emb_key=key, cache=False, queries=asked)["dist"], k)
    kth /= len(keys)
    score = kth[pos]
    ids_all = np.asarray(feats["ids"], np.int64)
    first = nn["rows"][pos, 0] if nn["rows"].shape[1] else np.full(len(pos), -1)
    cols = {"outlier_neighbour": np.where(first >= 0, ids_all[np.clip(first, 0, None)], -1)}
    ok = np.isfinite(score)
    if ok.sum() < 2:
        return IssueResult(np.zeros(len(pos), bool), score, "outlier: too few training samples, nothing flagged",
                           columns=cols, summary={"n_flagged": 0})
    what = (f"cosine distance to the {k}-th nearest training embedding" if len(keys) == 1 else
            f"mean over {len(keys)} seed models of the cosine distance to the {k}-th nearest training embedding")
    val = np.flatnonzero(split == "val") if split is not None else np.zeros(0, int)
    ref = kth[val][np.isfinite(kth[val])]
    if len(ref) >= MIN_REFERENCE:
        thr = float(np.quantile(ref, 1.0 - fpr))
        lo, hi = rate_interval(len(ref), fpr)
        rule = (f"{what} > {thr:.4g}, the {1 - fpr:.1%} quantile "
                f"of the {len(ref)} val images' (a fraction {fpr:g} of val images lies beyond it; of new images "
                f"{lo:.1%}–{hi:.1%}, {RATE_LEVEL:.0%} interval from {len(ref)} val images)")
        facts = {"reference": "val", "n_reference": int(len(ref)), "fpr": float(fpr),
                 "fpr_interval": [lo, hi], "fpr_interval_level": RATE_LEVEL}
    else:
        thr, facts = _mad_cut(score[ok], c)
        rule = f"{what} > median + {c:g}·1.4826·MAD ({thr:.4g})"
    flagged = ok & (score > thr)
    summary = {"n_flagged": int(flagged.sum()), "k": int(k), "models": len(keys), "threshold": float(thr),
               "cut": float(thr), "fraction_flagged": float(flagged.mean()), "index": nn["kind"], **facts}
    return IssueResult(flagged=flagged, score=score, rule=rule, columns=cols, summary=summary)


def _kth(dist: np.ndarray, k: int) -> np.ndarray:
    """The k-th column of kNN distances [M, ≥k] as float64 [M] (NaN where missing or fewer than k columns)."""
    kth = dist[:, k - 1] if dist.shape[1] >= k else np.full(len(dist), np.nan)
    return np.where(np.isfinite(kth), kth, np.nan).astype(np.float64)


def _mad_cut(x: np.ndarray, c: float) -> tuple[float, dict]:
    """median + c · 1.4826 · MAD of x (mean-absolute-deviation fallback) → (cut, facts)."""
    from pipeline.rules.threshold import MAD_SCALE

    med = float(np.median(x))
    mad = float(np.median(np.abs(x - med)))
    scale = MAD_SCALE * mad if mad > 0 else 1.2533 * float(np.mean(np.abs(x - med)))
    thr = med + float(c) * scale if scale > 0 else np.inf
    return thr, {"reference": "training scores (robust z: fewer than 50 val images)", "median": med, "mad": mad,
                 "c": float(c)}


@ISSUES.register("outlier", needs=("embeddings",),
                 doc="cosine distance to the flag.outlier_k-th nearest training embedding (mean over the seed "
                     "models: score.seed_embeddings) above the (1 − flag.outlier_fpr) quantile of the val images' "
                     "(robust z > flag.outlier_mad without val)")
def outlier(inputs, cfg: FlagConfig) -> IssueResult:
    return knn_outliers(inputs.features(), k=cfg.outlier_k, c=cfg.outlier_mad, seed=cfg.seed, fpr=cfg.outlier_fpr)
