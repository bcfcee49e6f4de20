"""The `flag` stage: turn scores into flags (scores/flags.csv: id,flagged,rule,value).

Rules live in pipeline/flag.py; this module gathers their inputs (a score column, projected
last-layer gradient vectors, or k-fold out-of-sample probabilities) and writes the outputs.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline.data.dataset import integer_column
from pipeline.errors import CleanError


def _read_csv(path: Path, what: str, fix: str):
    import pandas as pd

    if not path.exists():
        raise CleanError(f"{what} not found: {path}; {fix}")
    try:
        return pd.read_csv(path)
    except Exception as e:  # noqa: BLE001 - any parser failure is a bad input file
        msg = " ".join(str(e).split())[:200]
        raise CleanError(f"{path}: not a readable CSV ({type(e).__name__}: {msg}); {fix}") from None


def read_scores(path: str | Path):
    """Read scores.csv → DataFrame; CleanError when missing, unreadable, or malformed.

    Checks: columns id and label, integer ids (unique) and labels, numeric score columns
    (NaN allowed: a score that was not computed).
    """
    import pandas as pd

    from pipeline.params import SCORE_NAMES

    path = Path(path)
    fix = "regenerate it with `clean score`"
    df = _read_csv(path, "scores", "run `clean score` first")
    need = ["id", "label"]
    miss = [c for c in need if c not in df.columns]
    if miss:
        raise CleanError(f"{path}: missing column(s) {', '.join(miss)}; {fix}")
    if len(df) == 0:
        raise CleanError(f"{path}: no rows; {fix}")
    for col in ["id", "label"] + [c for c in ("pred", "noisy") if c in df.columns]:
        integer_column(df, col, path, fix)
    for col in [c for c in SCORE_NAMES if c in df.columns]:
        vals = pd.to_numeric(df[col], errors="coerce")
        bad = vals.isna() & df[col].notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise CleanError(f"{path}: column '{col}' must hold numbers; row {row + 2} has {df[col].iloc[row]!r}; {fix}")
        df[col] = vals.astype(np.float64)
    if df["id"].duplicated().any():
        raise CleanError(f"{path}: duplicate id {int(df['id'][df['id'].duplicated()].iloc[0])}; {fix}")
    return df


def read_flags(path: str | Path, ids=None):
    """Read flags.csv → DataFrame (id int, flagged bool, ...); CleanError when malformed.

    `ids`: the training ids it must cover exactly (flags from another scores/manifest → error).
    """
    path = Path(path)
    fix = "re-run `clean flag`"
    df = _read_csv(path, "flags", "run `clean flag` first")
    miss = [c for c in ("id", "flagged") if c not in df.columns]
    if miss:
        raise CleanError(f"{path}: missing column(s) {', '.join(miss)}; {fix}")
    integer_column(df, "id", path, fix)
    f = df["flagged"].astype(str).str.strip().str.lower()
    ok = f.isin(["0", "1", "true", "false", "0.0", "1.0"])
    if not ok.all():
        row = int(np.flatnonzero(~ok.to_numpy())[0])
        raw = df["flagged"].iloc[row]
        raise CleanError(f"{path}: column 'flagged' must be 0 or 1; row {row + 2} has "
                         f"{raw.item() if hasattr(raw, 'item') else raw!r}; {fix}")
    df["flagged"] = f.isin(["1", "true", "1.0"]).to_numpy()
    if df["id"].duplicated().any():
        raise CleanError(f"{path}: duplicate id {int(df['id'][df['id'].duplicated()].iloc[0])}; {fix}")
    if ids is not None:
        have, want = set(df["id"].tolist()), set(np.asarray(ids).tolist())
        if have != want:
            extra, lack = sorted(have - want), sorted(want - have)
            what = (f"id {extra[0]} is not a training id" if extra else f"training id {lack[0]} has no flag")
            raise CleanError(f"{path} does not match the training ids ({what}; {len(extra)} extra, {len(lack)} "
                             f"missing); the flags come from other scores: {fix}")
    return df


def gradient_features(model_dir: str | Path, manifest: str | Path, ids: np.ndarray, dim: int, seed: int,
                      device: str = "cpu", batch_size: int = 512) -> np.ndarray:
    """Last-layer gradient vectors vec(r ⊗ h) ⊕ r of the samples `ids` → [N, min(dim, C·(D+1))].

    Exact when C·(D+1) ≤ dim, else a seeded Gaussian random projection to `dim` (JL).
    """
    import torch

    from pipeline.data.dataset import read_manifest
    from pipeline.scores.gradnorm import forward_logits_features, grad_vectors_last, last_layer_residual, project_last_layer_grads
    from pipeline.data.images import load_images
    from pipeline.training.infer import batches, normalize
    from pipeline.models import check_fits_data, load_trained

    model, cfg = load_trained(model_dir, device)
    check_fits_data(cfg, manifest, model_dir)
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

    from pipeline.rules import base as rules
    from pipeline.io import write_frame

    t0 = time.perf_counter()
    df = read_scores(scores_csv)
    ids = df["id"].to_numpy(np.int64)
    if method in ("quantile", "mad", "gmm"):
        if score not in df.columns:
            raise CleanError(f"flag.score = {score!r} is not a column of {scores_csv}; "
                             f"use one of: {', '.join(c for c in df.columns if c not in ('id', 'path', 'label', 'pred'))}")
        from pipeline.views.compare import LOW_IS_TOP

        vals = df[score].to_numpy(np.float64)
        if np.isnan(vals).all():
            raise CleanError(f"{scores_csv}: column '{score}' is empty (not computed); choose another flag.score")
        bad = ~np.isfinite(vals)
        if bad.any():
            raise CleanError(f"{scores_csv}: column '{score}' has {int(bad.sum())} NaN/inf value(s) (first: id "
                             f"{int(ids[np.flatnonzero(bad)[0]])}); re-run `clean score` or choose another flag.score")
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
    from pipeline.training.crossfit import out_of_sample_probs
    from pipeline.data.dataset import classes_path_for, read_classes, read_manifest
    from pipeline.data.images import load_images
    from pipeline.data.dataset import image_size_of

    classes = read_classes(classes_path_for(manifest))["classes"]
    df = read_manifest(manifest, classes).set_index("id")
    missing = np.setdiff1d(ids, df.index.to_numpy())
    if len(missing):
        raise CleanError(f"scores hold id {int(missing[0])} which is not in {manifest}; rerun `clean score`")
    rows = df.loc[ids]
    images = load_images(rows["path"].tolist(), Path(manifest).parent, image_size_of(recipe.image_size))
    return out_of_sample_probs(images, rows["label"].to_numpy(np.int64), len(classes), recipe, folds, seed, progress)
