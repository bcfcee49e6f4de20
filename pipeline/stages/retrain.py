"""The `retrain` stage: round 2 of docs/methods.md §5.2 — train from scratch on a pruned
dataset version, then evaluate on the untouched test split of the original manifest.

`retrain` writes every output dvc.yaml's `retrain` stage declares: the model folder
(pipeline/stages/train.py), metrics_dir/<name>.json and plots_dir/confusion_<name>.csv
(pipeline/stages/evaluate.py).
"""
from __future__ import annotations

from pathlib import Path

from pipeline.training.recipe import Recipe


def retrain(manifest: str | Path, test_manifest: str | Path, out_dir: str | Path, name: str, recipe: Recipe,
            seeds: list[int], device: str, metrics_dir: str | Path, plots_dir: str | Path, progress=None) -> dict:
    """Stage: train `recipe` from scratch on `manifest`'s train split (one run per seed) into
    `out_dir`, then evaluate every run on `test_manifest`'s test split → the metrics dict
    (also in metrics_dir/<name>.json; the confusion data in plots_dir/confusion_<name>.csv)."""
    from pipeline.stages.evaluate import evaluate
    from pipeline.stages.train import train

    train(manifest, out_dir, recipe, seeds=seeds, progress=progress)
    return evaluate(out_dir, test_manifest, name, metrics_dir, plots_dir, device=device, progress=progress)
