"""The `flag` stage: turn scores into flags (scores/flags.csv: id,flagged,rule,value).

Rules live in pipeline/flag.py; this module gathers their inputs (a score column, projected
last-layer gradient vectors, or k-fold out-of-sample probabilities) and writes the outputs.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .errors import CleanError


def read_scores(path: str | Path):
    """Read scores.csv → DataFrame; CleanError when missing or without the needed columns."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise CleanError(f"scores not found: {path}; run `clean score` first")
    df = pd.read_csv(path)
    need = ["id", "label"]
    miss = [c for c in need if c not in df.columns]
    if miss:
        raise CleanError(f"{path}: missing column(s) {', '.join(miss)}; regenerate it with `clean score`")
    if df["id"].duplicated().any():
        raise CleanError(f"{path}: duplicate id {int(df['id'][df['id'].duplicated()].iloc[0])}; regenerate it with `clean score`")
    return df


def gradient_features(model_dir: str | Path, manifest: str | Path, ids: np.ndarray, dim: int, seed: int,
                      device: str = "cpu", batch_size: int = 512) -> np.ndarray:
    """Last-layer gradient vectors vec(r ⊗ h) ⊕ r of the samples `ids` → [N, min(dim, C·(D+1))].

    Exact when C·(D+1) ≤ dim, else a seeded Gaussian random projection to `dim` (JL).
    """
    import torch

    from .dataset import read_manifest
    from .gradnorm import forward_logits_features, grad_vectors_last, last_layer_residual, project_last_layer_grads
    from .images import load_images
    from .infer import batches, normalize
    from .models import load_trained

    model, cfg = load_trained(model_dir, device)
    df = read_manifest(manifest, cfg["classes"]).set_index("id")
    missing = np.setdiff1d(ids, df.index.to_numpy())
    if len(missing):
        raise CleanError(f"scores hold id {int(missing[0])} which is not in {manifest}; the scores come from "
                         "another manifest: rerun `clean score`")
    rows = df.loc[ids]
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


def flag(scores_csv: str | Path, out_dir: str | Path, method: str = "mad", score: str = "loss",
         quantile: float = 0.05, threshold: float = 3.5, contamination: float = 0.05, projection_dim: int = 256,
         folds: int = 4, seed: int = 0, model_dir: str | Path | None = None, manifest: str | Path | None = None,
         recipe=None, device: str = "cpu", progress=None) -> dict:
    """Stage: flag suspicious samples → out_dir/flags.csv (id,flagged,rule,value) and a summary dict.

    `isolation-forest` needs model_dir + manifest (gradient vectors); `confident` needs
    manifest + recipe (k-fold cross-fitting trains `folds` models). When scores carry the
    injected-noise truth (`noisy`), the summary has precision, recall and AUROC against it.
    """
    import pandas as pd

    from . import flag as rules
    from .io import write_frame

    t0 = time.perf_counter()
    df = read_scores(scores_csv)
    ids = df["id"].to_numpy(np.int64)
    if method in ("quantile", "mad", "gmm"):
        if score not in df.columns:
            raise CleanError(f"flag.score = {score!r} is not a column of {scores_csv}; "
                             f"use one of: {', '.join(c for c in df.columns if c not in ('id', 'path', 'label', 'pred'))}")
        from .compare import LOW_IS_TOP

        vals = df[score].to_numpy(np.float64)
        if np.isnan(vals).all():
            raise CleanError(f"{scores_csv}: column '{score}' is empty (not computed); choose another flag.score")
        # rules flag high values; for margin/aum/confidence a LOW value is the suspicious one
        name = score
        if score in LOW_IS_TOP:
            vals, name = -vals, f"-{score}"
        if method == "quantile":
            res = rules.flag_quantile(vals, quantile, name)
        elif method == "mad":
            res = rules.flag_mad(vals, threshold, name)
        else:
            res = rules.flag_gmm(vals, name, seed)
    elif method == "isolation-forest":
        if model_dir is None or manifest is None:
            raise CleanError("flag.method = isolation-forest needs --model and --manifest (last-layer gradients)")
        feats = gradient_features(model_dir, manifest, ids, projection_dim, seed, device)
        res = rules.flag_isolation_forest(feats, contamination, seed)
    elif method == "confident":
        if manifest is None or recipe is None:
            raise CleanError("flag.method = confident needs --manifest and the training recipe (params.yaml)")
        probs = _crossfit_probs(manifest, ids, recipe, folds, seed, progress)
        res = rules.flag_confident(probs, df["label"].to_numpy(np.int64))
    else:
        raise CleanError(f"flag.method = {method!r} is not allowed; use one of: quantile, mad, gmm, isolation-forest, confident")
    out = pd.DataFrame({"id": ids, "flagged": res.flagged.astype(np.int64), "rule": res.rule, "value": res.value})
    write_frame(Path(out_dir) / "flags.csv", out)
    summary = {"method": method, "rule": res.rule, "n": int(len(out)), "n_flagged": int(res.flagged.sum()),
               "seconds": round(time.perf_counter() - t0, 3)}
    if "noisy" in df.columns:
        truth = df["noisy"].to_numpy().astype(bool)
        p, r = rules.precision_recall(res.flagged, truth)
        summary.update({"n_noisy": int(truth.sum()), "precision": p, "recall": r})
        if 0 < truth.sum() < len(truth):
            summary["auroc"] = rules.auroc(res.value, truth)
    return summary


def _crossfit_probs(manifest, ids, recipe, folds, seed, progress):
    from .crossfit import out_of_sample_probs
    from .dataset import classes_path_for, read_classes, read_manifest
    from .images import load_images
    from .dataset import image_size_of

    classes = read_classes(classes_path_for(manifest))["classes"]
    df = read_manifest(manifest, classes).set_index("id")
    missing = np.setdiff1d(ids, df.index.to_numpy())
    if len(missing):
        raise CleanError(f"scores hold id {int(missing[0])} which is not in {manifest}; rerun `clean score`")
    rows = df.loc[ids]
    images = load_images(rows["path"].tolist(), Path(manifest).parent, image_size_of(recipe.image_size))
    return out_of_sample_probs(images, rows["label"].to_numpy(np.int64), len(classes), recipe, folds, seed, progress)
