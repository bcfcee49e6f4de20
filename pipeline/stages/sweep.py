"""The paper's experiment: for each strategy × keep fraction, prune, retrain from scratch
(every seed) and evaluate on the untouched test split; then aggregate (mean ± std)."""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import PruneConfig, SweepConfig
from pipeline.errors import CleanError
from pipeline.io import write_frame, write_json
from pipeline.stages.evaluate import evaluate_model, run_dirs, summarize_runs
from pipeline.stages.prune import prune
from pipeline.stages.train import train
from pipeline.training.recipe import Recipe


def sweep_point(manifest: str | Path, scores_csv: str | Path, out_dir: str | Path, config: PruneConfig,
                recipe: Recipe, seeds: list[int], flags_csv: str | Path | None = None, progress=None) -> dict:
    """One sweep point (the prune `config`: strategy, keep, by, ...) → out_dir/{pruned.csv,
    classes.json, prune.json, metrics.json}, retrained with `recipe` for every seed of `seeds`.

    metrics.json: strategy, keep, n_kept, accuracy_mean, accuracy_std (ddof=1), runs. The
    retrained models are temporary (only their test metrics are kept).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summ = prune(manifest, scores_csv, out_dir / "pruned.csv", out_dir / "prune.json", config, flags_csv=flags_csv)
    strategy, keep, by, balanced = config.strategy, config.keep, config.by, config.balanced
    work = Path(tempfile.mkdtemp(prefix=".models.", dir=out_dir))
    try:
        recipe = _no_extras(recipe)
        train(out_dir / "pruned.csv", work, recipe, seeds=seeds, progress=progress)
        results = [evaluate_model(d, manifest, "test", recipe.device if recipe.device != "auto" else "cpu")
                   for d in run_dirs(work)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    m = summarize_runs(results, "test")
    point = {"strategy": strategy, "keep": keep, "by": by, "balanced": balanced, "n_kept": summ["n_kept"],
             "n_total": summ["n_total"], "label_entropy_kept": summ["label_entropy"]["kept"],
             "accuracy_mean": m["accuracy"], "accuracy_std": m["accuracy_std"], "n_seeds": m["n_seeds"],
             "runs": m["runs"]}
    write_json(out_dir / "metrics.json", point)
    return point


def _no_extras(recipe: Recipe) -> Recipe:
    """Sweep retrains need no checkpoints or tracked-sample records: keep them cheap."""
    return replace(recipe, checkpoint_every=recipe.epochs, track=0)


def collect(sweep_dir: str | Path, out_csv: str | Path, strategies=None, keeps=None) -> "object":
    """Aggregate sweep_dir/*/metrics.json → out_csv (strategy,keep,accuracy_mean,accuracy_std,
    n_seeds,n_kept,label_entropy_kept), sorted by strategy then keep. Returns the DataFrame.

    When `strategies`/`keeps` are given, only those points are collected (stale ones ignored).
    """
    rows = []
    for f in sorted(Path(sweep_dir).glob("*/metrics.json")):
        try:
            m = json.loads(f.read_text())
            if not isinstance(m, dict):
                raise ValueError("not a JSON object")
            missing = [k for k in ("strategy", "keep", "accuracy_mean", "accuracy_std", "n_seeds", "n_kept",
                                   "label_entropy_kept") if k not in m]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
            float(m["keep"])
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            raise CleanError(f"{f}: not a sweep result ({e}); re-run `clean sweep point` for it") from None
        if strategies is not None and m["strategy"] not in strategies:
            continue
        if keeps is not None and not np.isclose(keeps, m["keep"]).any():
            continue
        rows.append({k: m[k] for k in ("strategy", "keep", "accuracy_mean", "accuracy_std", "n_seeds", "n_kept",
                                       "label_entropy_kept")})
    if not rows:
        raise CleanError(f"no sweep results under {sweep_dir}; run `dvc repro sweep` or `clean sweep point`")
    df = pd.DataFrame(rows).sort_values(["strategy", "keep"]).reset_index(drop=True)
    write_frame(out_csv, df)
    return df


#: the columns of the sweep summary (plots/sweep.csv)
SUMMARY_COLUMNS = ["strategy", "keep", "accuracy_mean", "accuracy_std", "n_seeds", "n_kept", "label_entropy_kept"]


def sweep(manifest: str | Path, scores_csv: str | Path, flags_csv: str | Path | None, out_dir: str | Path,
          summary_csv: str | Path, config: SweepConfig, prune_config: PruneConfig, recipe: Recipe, seeds: list[int],
          progress=None):
    """Stage: every point of config.strategies × config.keeps (:func:`sweep_point` into
    out_dir/<strategy>-<keep>, the other prune settings from `prune_config`) then their summary
    → summary_csv. No keeps (the default: the sweep is opt-in) writes an empty summary at once.
    Returns the summary DataFrame."""
    strategies, keeps = config.strategies, config.keeps
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for strategy in strategies:
        for keep in keeps:
            if progress:
                progress("log", message=f"sweep point {strategy} keep={keep:g}")
            sweep_point(manifest, scores_csv, out_dir / f"{strategy}-{keep:g}",
                        replace(prune_config, strategy=strategy, keep=keep), recipe, seeds, flags_csv, progress)
    if not keeps or not strategies:
        df = pd.DataFrame(columns=SUMMARY_COLUMNS)
        write_frame(summary_csv, df)
        return df
    return collect(out_dir, summary_csv, strategies, keeps)
