"""Evaluation on the untouched test split → metrics JSON (for `dvc metrics diff`) and
confusion-matrix plot data (for `dvc plots`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def evaluate(model_dir: str | Path, manifest: str | Path, name: str, split: str = "test",
             metrics_dir: str | Path = "metrics", plots_dir: str | Path = "plots",
             device: str = "auto", batch_size: int = 512, progress=None) -> dict:
    """Evaluate `model_dir` on `split` of `manifest`.

    Writes `metrics_dir/<name>.json` (accuracy, loss [nats], per-class accuracy, n) and
    `plots_dir/confusion_<name>.csv` (actual,predicted class names, one row per image).
    Returns the metrics dict.
    """
    import torch
    import torch.nn.functional as F

    from .dataset import load_split, read_manifest
    from .device import resolve_device
    from .errors import CleanError
    from .infer import predict_logits
    from .io import write_frame, write_json
    from .models import load_trained

    device = resolve_device(device)
    model, cfg = load_trained(model_dir, device)
    classes = cfg["classes"]
    df = read_manifest(manifest, classes)
    data = load_split(manifest, split, cfg["image_size"], in_chans=cfg["in_chans"], df=df)
    if data.images.shape[1] != cfg["in_chans"]:
        raise CleanError(f"{model_dir}: model expects {cfg['in_chans']}-channel images, data has {data.images.shape[1]}")
    if progress:
        progress("start", desc=f"evaluate {name}", total=len(data))
    logits = predict_logits(model, data.images, cfg["mean"], cfg["std"], batch_size, device, progress)
    if progress:
        progress("end")
    y = torch.as_tensor(data.labels)
    pred = logits.argmax(1)
    correct = (pred == y).numpy()
    per_class = {}
    for c, cname in enumerate(classes):
        m = data.labels == c
        per_class[cname] = float(correct[m].mean()) if m.any() else None
    metrics = {
        "accuracy": float(correct.mean()),
        "loss": float(F.cross_entropy(logits, y).item()),
        "n": int(len(y)),
        "split": split,
        "model": cfg["model"],
        "n_train": cfg.get("n_train"),
        "per_class_accuracy": per_class,
    }
    import pandas as pd

    names = np.asarray(classes, dtype=object)
    write_frame(Path(plots_dir) / f"confusion_{name}.csv",
                pd.DataFrame({"actual": names[data.labels], "predicted": names[pred.numpy()]}))
    write_json(Path(metrics_dir) / f"{name}.json", metrics)
    return metrics
