"""The `retrain` stage: round 2 of docs/methods.md §5.2 — train from scratch on a pruned
dataset version, then evaluate on the untouched test split of the original manifest.

`retrain` writes every output dvc.yaml's `retrain` stage declares: the model folder
(pipeline/stages/train.py), metrics_dir/<name>.json and plots_dir/confusion_<name>.csv
(pipeline/stages/evaluate.py).
"""
from __future__ import annotations

from pathlib import Path

from pipeline.stages.evaluate import details_path, evaluate
from pipeline.stages.train import train
from pipeline.training.recipe import Recipe


def retrain(manifest: str | Path, test_manifest: str | Path, out_dir: str | Path, name: str, recipe: Recipe,
            seeds: list[int], device: str, metrics_dir: str | Path, plots_dir: str | Path, progress=None,
            baseline: str | None = None, flags_csv=None, decisions=None) -> dict:
    """Stage: train `recipe` from scratch on `manifest`'s train split (one run per seed) into
    `out_dir`, then evaluate every run on `test_manifest`'s test split → the metrics dict
    (also in metrics_dir/<name>.json; the confusion data in plots_dir/confusion_<name>.csv).
    With `baseline` (e.g. "base", evaluated before into plots_dir) the metrics carry the
    verdict against it over the seeds (pipeline/verdict.py); a baseline never evaluated is
    skipped with a log line. `flags_csv` / `decisions`: the test split's label decisions
    (pipeline/stages/evaluate.py set_aside)."""

    train(manifest, out_dir, recipe, seeds=seeds, progress=progress)
    if baseline is not None and not details_path(plots_dir, baseline).exists():
        if progress:
            progress("log", message=f"no {details_path(plots_dir, baseline)}: no verdict against '{baseline}' "
                                    f"(run `clean evaluate --name {baseline}` first)")
        baseline = None
    return evaluate(out_dir, test_manifest, name, metrics_dir, plots_dir, device=device, progress=progress,
                    baseline=baseline, flags_csv=flags_csv, decisions=decisions)
