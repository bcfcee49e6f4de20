"""The `flag` stage: scores in → scores/flags.csv, the top-flagged grid, metrics/flags.json.

The rules live in pipeline/rules/ (registered in RULES); this module gathers their inputs,
runs the chosen one and writes every output the stage declares in dvc.yaml.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline.errors import CleanError
from pipeline.params import DEFAULTS
from pipeline.rules.outliers import gradient_features  # noqa: F401  (part of the stage's public API)

_F = DEFAULTS["flag"]


def flag(scores_csv: str | Path, out_dir: str | Path, method: str = _F["method"], score: str = _F["score"],
         quantile: float = _F["quantile"], threshold: float = _F["threshold"],
         contamination: float = _F["contamination"], projection_dim: int = _F["projection_dim"],
         folds: int = _F["folds"], seed: int = _F["seed"], model_dir: str | Path | None = None,
         manifest: str | Path | None = None, recipe=None, device: str = "cpu", progress=None,
         metrics_path: str | Path | None = None, grid: int = 0) -> dict:
    """Stage: flag suspicious samples → out_dir/flags.csv (id,flagged,rule,value); returns the summary.

    The rule `method` comes from the RULES registry; `isolation-forest` needs model_dir +
    manifest (gradient vectors), `confident` manifest + recipe (k-fold cross-fitting trains
    `folds` models). With `metrics_path` the summary is also written there (JSON); with
    `grid` > 0 and a manifest, out_dir/top_flagged.png shows the `grid` top flagged images.
    When scores carry the injected-noise truth (`noisy`) the summary has precision, recall
    and AUROC against it. Defaults are params.yaml's (pipeline/params.py).
    """
    from pipeline.formats.tables import read_scores
    from pipeline.io import write_frame, write_json
    from pipeline.registry import RULES
    from pipeline.rules.base import RuleInputs

    t0 = time.perf_counter()
    if method not in RULES:
        raise CleanError(f"flag.method = {method!r} is not allowed; use one of: {', '.join(RULES)}")
    df = read_scores(scores_csv)
    cfg = {"method": method, "score": score, "quantile": quantile, "threshold": threshold,
           "contamination": contamination, "projection_dim": projection_dim, "folds": folds, "seed": seed}
    inputs = RuleInputs(df, scores_csv, model_dir, manifest, recipe, device, progress)
    res = RULES[method].fn(inputs, cfg)
    out_dir = Path(out_dir)
    write_frame(out_dir / "flags.csv", _frame(inputs.ids, res))
    summary = _summary(df, res, method, time.perf_counter() - t0)
    if metrics_path is not None:
        write_json(metrics_path, summary)
    if grid and manifest is not None:
        from pipeline.views.grid import top_grid

        top_grid(scores_csv, by="value", k=grid, path=out_dir / "top_flagged.png", flags_csv=out_dir / "flags.csv",
                 only_flagged=True, manifest=manifest)
    return summary


def _frame(ids: np.ndarray, res):
    import pandas as pd

    return pd.DataFrame({"id": ids, "flagged": res.flagged.astype(np.int64), "rule": res.rule, "value": res.value})


def _summary(df, res, method: str, seconds: float) -> dict:
    """Counts, and precision/recall/AUROC against the injected-noise truth when it is known."""
    from pipeline.rules.metrics import auroc, precision_recall

    summary = {"method": method, "rule": res.rule, "n": int(len(df)), "n_flagged": int(res.flagged.sum()),
               "seconds": round(seconds, 3)}
    if "noisy" in df.columns:
        truth = df["noisy"].to_numpy().astype(bool)
        p, r = precision_recall(res.flagged, truth)
        summary.update({"n_noisy": int(truth.sum()), "precision": p, "recall": r})
        if 0 < truth.sum() < len(truth):
            summary["auroc"] = auroc(res.value, truth)
    return summary
