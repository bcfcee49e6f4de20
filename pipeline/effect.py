"""What a dataset version does to the model: its predicted change of the mean validation loss
(from the attribution of the removed / relabelled images, `clean prune`) and the measured one
(after retraining, `clean retrain`) — docs/methods.md §3.1.

The prediction is Σ_{i removed} e_m(i) for each trained seed's model m, with e_m(i) the
calibrated TRAK effect of removing image i on the mean loss of the reference validation rows
(scores/attribution.npz, pipeline/scores/attribution.py); the value is the mean over the models
and the uncertainty their standard deviation. A relabelled image counts as the removal of its
old label (the gain from the new label is not predicted). The measurement is the mean over
the retrained seeds of the mean loss on the same reference rows, minus the base models'.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import CleanError

#: the one flat key in metrics/<version>.json (measured) and metrics/pred.json (predicted): one more
#: column keeps `dvc metrics show` within 120 characters; the spread is in prune/summary.json
KEY = "dloss"


def flat(value: float) -> dict:
    """{KEY: value rounded to 4 decimals} for a DVC metrics file."""
    return {KEY: round(float(value), 4)}


def read_attribution(path: str | Path) -> dict:
    """scores/attribution.npz → dict of arrays (CleanError naming the file when unreadable)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError) as exc:
        raise CleanError(f"{path}: not a readable attribution file ({exc}); rerun `clean score`") from exc


def effects_of(path: str | Path, train_ids: np.ndarray) -> np.ndarray | None:
    """Each seed model's removal effect (nats) of the training ids [N] → float64 [M, N]; None when
    `path` (scores/attribution.npz) is absent or holds no model (score.importance false, no val
    split). CleanError when the file is unreadable or lacks one of the ids."""
    path = Path(path)
    if not path.exists():
        return None
    a = read_attribution(path)
    if a["effects"].shape[0] == 0:
        return None
    return a["effects"][:, positions(a["ids"], np.asarray(train_ids, np.int64), path)]


def predicted_change(attribution: str | Path, train_ids: np.ndarray, removed: np.ndarray,
                     relabeled: np.ndarray | None = None) -> dict:
    """The prediction for a version: `train_ids` [N] the training ids, `removed` / `relabeled`
    bool [N] → {predicted_dval_loss (nats, mean over models), predicted_dval_loss_sd,
    per_model, val_loss_base, n_reference_val, n_removed, n_relabeled, attribution}."""
    a = read_attribution(attribution)
    pos = positions(a["ids"], np.asarray(train_ids, np.int64), attribution)
    changed = np.asarray(removed, bool) | (np.zeros(len(pos), bool) if relabeled is None else np.asarray(relabeled, bool))
    per = a["effects"][:, pos][:, changed].sum(1)
    return {"predicted_dval_loss": float(per.mean()),
            "predicted_dval_loss_sd": float(per.std(ddof=1)) if len(per) > 1 else 0.0,
            "per_model": [float(v) for v in per], "val_loss_base": float(a["val_loss"].mean()),
            "n_reference_val": int(len(a["val_ids"])), "n_removed": int(np.sum(removed)),
            "n_relabeled": int(0 if relabeled is None else np.sum(relabeled)),
            "relabels": "counted as the removal of the old label", "attribution": str(attribution)}


def positions(ids: np.ndarray, train_ids: np.ndarray, path) -> np.ndarray:
    """Positions in the attribution file of each training id (CleanError when one is missing)."""
    order = np.argsort(ids)
    at = np.searchsorted(ids, train_ids, sorter=order).clip(0, len(ids) - 1)
    pos = order[at]
    missing = ids[pos] != train_ids
    if missing.any():
        raise CleanError(f"{path} has no attribution for training id {int(train_ids[missing][0])} "
                         f"({int(missing.sum())} missing); it comes from another manifest: rerun `clean score`")
    return pos


def measured_change(model_dir: str | Path, manifest: str | Path, prediction: dict, device: str = "cpu") -> dict:
    """Mean over the model folder's seeds of the mean loss on the reference validation rows of
    `prediction` (its attribution file), minus the base models' → {dval_loss, val_loss, ...}."""
    import torch
    import torch.nn.functional as F

    from pipeline.data.dataset import load_split
    from pipeline.formats.manifest import read_manifest
    from pipeline.models import load_trained, run_dirs
    from pipeline.training.infer import predict_logits

    a = read_attribution(prediction["attribution"])
    ref_ids = a["val_ids"]
    losses = []
    for d in run_dirs(model_dir):
        model, cfg = load_trained(d, device)
        df = read_manifest(manifest, cfg["classes"])
        val = load_split(manifest, "val", cfg["image_size"], in_chans=cfg["in_chans"], df=df)
        keep = np.isin(val.ids, ref_ids)
        if keep.sum() != len(ref_ids):
            raise CleanError(f"{manifest}: its validation rows are not those of {prediction['attribution']}; "
                             "prune and score the same manifest")
        logits = predict_logits(model, val.images[keep], cfg["mean"], cfg["std"], device=device)
        y = torch.as_tensor(np.asarray(val.labels[keep], np.int64))
        losses.append(float(F.cross_entropy(logits.double(), y).item()))
    val_loss = float(np.mean(losses))
    return {"dval_loss": val_loss - prediction["val_loss_base"], "val_loss": val_loss, "val_loss_runs": losses}


def line(name: str, m: dict) -> str:
    """One line: the predicted and the measured change of the mean validation loss."""
    return (f"{name}: validation loss predicted {m['dval_loss_pred']:+.4f} ± {m['dval_loss_pred_sd']:.4f} nats, "
            f"measured {m['dval_loss']:+.4f}")
