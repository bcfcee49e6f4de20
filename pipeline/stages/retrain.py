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
            baseline: str | None = None, flags_csv=None, decisions=None, summary: str | Path | None = None) -> dict:
    """Stage: train `recipe` from scratch on `manifest`'s train split (one run per seed) into
    `out_dir`, then evaluate every run on `test_manifest`'s test split → the metrics dict
    (also in metrics_dir/<name>.json; the confusion data in plots_dir/confusion_<name>.csv).
    With `baseline` (e.g. "base", evaluated before into plots_dir) the metrics carry the
    verdict against it over the seeds (pipeline/verdict.py); a baseline never evaluated is
    skipped with a log line. `flags_csv` / `decisions`: the test split's label decisions
    (pipeline/stages/evaluate.py set_aside). With `summary` (prune/summary.json holding a prediction,
    `effect`) the metrics also carry the measured change of the mean validation loss beside the
    predicted one: `dloss` in metrics_dir/<name>.json (prune's metrics/pred.json holds the predicted
    one), and dval_loss, dval_loss_pred, dval_loss_pred_sd, val_loss_runs in the details (pipeline/effect.py)."""
    train(manifest, out_dir, recipe, seeds=seeds, progress=progress)
    if baseline is not None and not details_path(plots_dir, baseline).exists():
        if progress:
            progress("log", message=f"no {details_path(plots_dir, baseline)}: no verdict against '{baseline}' "
                                    f"(run `clean evaluate --name {baseline}` first)")
        baseline = None
    metrics = evaluate(out_dir, test_manifest, name, metrics_dir, plots_dir, device=device, progress=progress,
                       baseline=baseline, flags_csv=flags_csv, decisions=decisions)
    return _with_effect(metrics, summary, out_dir, manifest, name, metrics_dir, plots_dir, device)


def _with_effect(metrics: dict, summary, out_dir, manifest, name: str, metrics_dir, plots_dir, device: str) -> dict:
    """Add predicted vs measured change of the mean validation loss to the metrics files."""
    import json

    from pipeline.device import resolve_device
    from pipeline.effect import flat, measured_change
    from pipeline.io import write_json

    if summary is None or not Path(summary).exists():
        return metrics
    pred = json.loads(Path(summary).read_text()).get("effect")
    if not pred:
        return metrics
    got = measured_change(out_dir, manifest, pred, resolve_device(device))
    metrics.update(got, dval_loss_pred=pred["predicted_dval_loss"], dval_loss_pred_sd=pred["predicted_dval_loss_sd"])
    keys = json.loads((Path(metrics_dir) / f"{name}.json").read_text())
    keys.update(flat(got["dval_loss"]))
    write_json(Path(metrics_dir) / f"{name}.json", keys)
    write_json(details_path(plots_dir, name), metrics)
    return metrics
