"""The `flag` stage: scores in → scores/flags.csv, the top-flagged grid, metrics/flags.json.

The rules live in pipeline/rules/ (registered in RULES); this module gathers their inputs,
runs the chosen one and writes every output the stage declares in dvc.yaml.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import FlagConfig
from pipeline.device import resolve_device
from pipeline.errors import CleanError
from pipeline.formats.manifest import read_manifest
from pipeline.formats.tables import check_scores_fit, read_scores
from pipeline.io import write_frame, write_json
from pipeline.registry import ISSUES, RULES
from pipeline.rules.base import RuleInputs
from pipeline.rules.labels import heldout_issue_rows
from pipeline.rules.metrics import auroc, precision_recall
from pipeline.rules.outliers import gradient_features  # noqa: F401  (part of the stage's public API)
from pipeline.views.grid import top_grid


def flag(scores_csv: str | Path, out_dir: str | Path, config: FlagConfig = FlagConfig(), *,
         model_dir: str | Path | None = None, manifest: str | Path | None = None, recipe=None, progress=None,
         metrics_path: str | Path | None = None) -> dict:
    """Stage: find every issue type → out_dir/flags.csv, out_dir/issues.json; returns the summary.

    flags.csv (one row per training sample): id, flagged, rule, value (the rule `config.method`
    from the RULES registry, which drives `drop-flagged`), then for each issue type of
    `config.issues` (None = every registered type, the ISSUES registry) `is_<type>` and
    `<type>_score`, then the detectors' extra columns (suggested_label, duplicate_group, ...).
    Every rule and issue type is called the same way: ``fn(RuleInputs, config)``.
    `isolation-forest` needs model_dir + manifest, `confident` manifest + recipe (k-fold
    cross-fitting, on `config.device`), `confident-dynamics` and the suggested labels model_dir
    (its training record), the embedding/image types scores/embeddings.npz beside scores_csv.
    With `metrics_path` the flat summary is also written there; with `config.grid` > 0 and a
    manifest, out_dir/top_flagged.png shows the top flagged images. Against injected noise
    (`noisy` in scores) the summary has precision, recall and AUROC of the label issues.
    """
    t0 = time.perf_counter()
    if config.method not in RULES:
        raise CleanError(f"flag.method = {config.method!r} is not allowed; use one of: {', '.join(RULES)}")
    types = list(ISSUES) if config.issues is None else list(config.issues)
    unknown = [t for t in types if t not in ISSUES]
    if unknown:
        raise CleanError(f"flag.issues: unknown issue type {unknown[0]!r}; use some of: {', '.join(ISSUES)}")
    df = read_scores(scores_csv)
    if manifest is not None and Path(manifest).exists():
        check_scores_fit(df, scores_csv, manifest)  # scores of another dataset never get flagged
    inputs = RuleInputs(df, scores_csv, model_dir, manifest, recipe, resolve_device(config.device), progress)
    res = inputs.rule_result(config)
    skipped = _skipped(types, df, scores_csv) if config.issues is None else {}
    found, seconds = {}, {}
    for t in (t for t in types if t not in skipped):
        t1 = time.perf_counter()
        found[t] = ISSUES[t].fn(inputs, config)
        seconds[t] = round(time.perf_counter() - t1, 3)
    out_dir = Path(out_dir)
    held = _heldout(found, model_dir, manifest, config, inputs.device)
    write_frame(out_dir / "flags.csv", _with_heldout(_frame(inputs.ids, res, found), held))
    summary = _summary(df, res, config.method, found, time.perf_counter() - t0)
    details = _details(inputs.ids, found, seconds)
    if held is not None:
        summary.update(_heldout_summary(held, manifest))
        details["label"]["heldout"] = _heldout_details(held)
    write_json(out_dir / "issues.json", {**details, **{t: {"skipped": why} for t, why in skipped.items()}})
    if metrics_path is not None:
        write_json(metrics_path, summary)
    if config.grid and manifest is not None:
        top_grid(scores_csv, by="value", k=config.grid, path=out_dir / "top_flagged.png",
                 flags_csv=out_dir / "flags.csv", only_flagged=True, manifest=manifest)
    return summary


def _skipped(types: list, df, scores_csv) -> dict:
    """{type: why} for the issue types ("every type") whose inputs are missing: no embeddings.npz,
    or an empty score column the type reads (its entry's `score`)."""
    emb = Path(scores_csv).parent / "embeddings.npz"
    skipped = {t: f"no {emb} (run `clean score` with score.embeddings: true)" for t in types
               if "embeddings" in ISSUES[t].needs and not emb.exists()}
    for t in types:
        col = ISSUES[t].extra.get("score")
        if col and (col not in df.columns or df[col].isna().all()):
            skipped[t] = f"no {col} values in {scores_csv} (run `clean score` with score.{col}: true)"
    return skipped


def _heldout(found: dict, model_dir, manifest, config, device: str):
    """The val/test label issues (pipeline/rules/labels.py) when `label` is checked and the base
    model and manifest are at hand, else None."""
    if "label" not in found or model_dir is None or manifest is None or not Path(manifest).exists():
        return None

    return heldout_issue_rows(model_dir, manifest, config.heldout_filter_by, device, config.label_min_p)


def _with_heldout(frame, held):
    """flags.csv = the training rows (split "train") + the val/test rows: is_label, label_score,
    suggested_label/_p; every other is_<type> 0, flagged 0 (the rule judges training images only),
    the other columns empty."""
    frame["split"] = "train"  # last: the columns before keep their places
    if held is None:
        return frame
    rows = pd.DataFrame({c: (0 if c.startswith("is_") or c == "flagged" else np.nan) for c in frame.columns},
                        index=range(len(held)))
    for c in held.columns:
        rows[c] = held[c].to_numpy()
    rows["rule"] = "heldout confident-learning"
    rows["value"] = held["label_score"].to_numpy()
    out = pd.concat([frame, rows[frame.columns]], ignore_index=True)
    for c in frame.columns:  # integer columns stay integers (empty where they do not apply)
        if pd.api.types.is_integer_dtype(frame[c]) and out[c].isna().any():
            out[c] = out[c].astype("Int64")
        elif pd.api.types.is_integer_dtype(frame[c]):
            out[c] = out[c].astype(np.int64)
    return out


def _heldout_summary(held, manifest) -> dict:
    """n_label_<split> and, against injected noise in the manifest, precision_/recall_<split>."""
    from pipeline.rules.metrics import precision_recall

    out = {}
    man = read_manifest(manifest).set_index("id")
    for split, part in held.groupby("split", sort=False):
        flagged = part["is_label"].to_numpy(bool)
        out[f"n_label_{split}"] = int(flagged.sum())
        if "noisy" in man.columns:
            truth = man["noisy"].reindex(part["id"]).fillna(0).to_numpy().astype(bool)
            if truth.any():
                out[f"precision_{split}"], out[f"recall_{split}"] = precision_recall(flagged, truth)
    return out


def _heldout_details(held, examples: int = 5) -> dict:
    """issues.json label.heldout: per split n, examples (most likely wrong first)."""
    out = {}
    for split, part in held.groupby("split", sort=False):
        hit = part[part["is_label"] == 1].sort_values(["label_score", "id"], ascending=[False, True])
        out[split] = {"n": int(len(hit)), "of": int(len(part)), "examples": [int(i) for i in hit["id"][:examples]]}
    return out


def _frame(ids: np.ndarray, res, found: dict):
    """flags.csv: id, flagged, rule, value, is_<type>/<type>_score per issue type, extra columns."""
    cols = {"id": ids, "flagged": res.flagged.astype(np.int64), "rule": res.rule, "value": res.value}
    for t, r in found.items():
        cols[f"is_{t}"] = np.asarray(r.flagged, bool).astype(np.int64)
        cols[f"{t}_score"] = np.round(np.asarray(r.score, np.float64), 6)
    for r in found.values():
        for k, v in r.columns.items():
            v = np.asarray(v)
            cols[k] = v.astype(np.int64) if v.dtype == bool else v
    return pd.DataFrame(cols)


def _summary(df, res, method: str, found: dict, seconds: float) -> dict:
    """Flat counts (metrics/flags.json), and precision/recall/AUROC of the label issues against
    the injected-noise truth when it is known."""
    summary = {"method": method, "rule": res.rule, "n": int(len(df)), "n_flagged": int(res.flagged.sum()),
               **{f"n_{t}": int(np.count_nonzero(r.flagged)) for t, r in found.items()},
               "seconds": round(seconds, 3)}
    if "noisy" in df.columns:
        truth = df["noisy"].to_numpy().astype(bool)
        p, r = precision_recall(res.flagged, truth)
        summary.update({"n_noisy": int(truth.sum()), "precision": p, "recall": r})
        if 0 < truth.sum() < len(truth):
            summary["auroc"] = auroc(res.value, truth)
    return summary


def _details(ids: np.ndarray, found: dict, seconds: dict, examples: int = 5) -> dict:
    """issues.json: per issue type its rule, count, example ids (most severe first), the
    detector's own summary (groups, conflicts, leakage, ...) and seconds."""
    out = {}
    for t, r in found.items():
        flagged = np.flatnonzero(np.asarray(r.flagged, bool))
        sev = np.nan_to_num(np.asarray(r.score, np.float64)[flagged], nan=-np.inf)
        top = flagged[np.lexsort((ids[flagged], -sev))][:examples]
        out[t] = {"rule": r.rule, "n": int(flagged.size), "examples": [int(i) for i in ids[top]],
                  **r.summary, "seconds": seconds[t]}
    return out
