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
from pipeline.formats.tables import check_scores_fit, read_scores
from pipeline.io import write_frame, write_json
from pipeline.registry import ISSUES, RULES
from pipeline.rules.base import RuleInputs
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
    write_frame(out_dir / "flags.csv", _frame(inputs.ids, res, found))
    summary = _summary(df, res, config.method, found, time.perf_counter() - t0)
    write_json(out_dir / "issues.json", {**_details(inputs.ids, found, seconds),
                                         **{t: {"skipped": why} for t, why in skipped.items()}})
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
