"""The `evaluate` stage: a model folder (every seed's run) on the untouched test split →
metrics_dir/<name>.json (for `dvc metrics diff`) and plots_dir/confusion_<name>.csv (for
`dvc plots`); `evaluate_model` (one run), `summarize_runs` (mean ± std over seeds) and
`run_dirs` (pipeline/models.py) serve the sweep too (docs/methods.md §5.3)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.dataset import load_split
from pipeline.device import resolve_device
from pipeline.errors import CleanError
from pipeline.formats.jsonfile import read_json
from pipeline.io import write_frame, write_json
from pipeline.models import run_dirs  # noqa: F401  (the sweep and the benches read it from here too)
from pipeline.training.infer import predict_logits
from pipeline.verdict import compare_runs

def evaluate_model(model_dir: str | Path, manifest: str | Path, split: str = "test", device: str = "cpu",
                   batch_size: int = 512, df=None, progress=None) -> dict:
    """Evaluate one trained model folder → {accuracy, loss, per_class_accuracy, labels [N], pred [N], classes}."""
    import torch
    import torch.nn.functional as F

    from pipeline.formats.manifest import read_manifest
    from pipeline.models import load_trained

    model, cfg = load_trained(model_dir, device)
    classes = cfg["classes"]
    if df is None:
        df = read_manifest(manifest, classes)
    data = load_split(manifest, split, cfg["image_size"], in_chans=cfg["in_chans"], df=df)
    if data.images.shape[1] != cfg["in_chans"]:
        raise CleanError(f"{model_dir}: model expects {cfg['in_chans']}-channel images, data has {data.images.shape[1]}")
    logits = predict_logits(model, data.images, cfg["mean"], cfg["std"], batch_size, device, progress)
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).any(1).sum())
        raise CleanError(f"{model_dir}: the model outputs NaN/inf for {bad} of {len(logits)} '{split}' images; "
                         "its weights are broken (training diverged?): retrain with a lower train.lr")
    y = torch.as_tensor(np.array(data.labels, np.int64))
    pred = logits.argmax(1)
    correct = (pred == y).numpy()
    per_class = {}
    for c, cname in enumerate(classes):
        m = data.labels == c
        per_class[cname] = float(correct[m].mean()) if m.any() else None
    return {"accuracy": float(correct.mean()), "loss": float(F.cross_entropy(logits, y).item()), "ids": data.ids,
            "per_class_accuracy": per_class, "labels": data.labels, "pred": pred.numpy(), "classes": classes,
            "seed": cfg.get("recipe", {}).get("seed"), "model": cfg["model"], "n_train": cfg.get("n_train")}


def summarize_runs(results: list[dict], split: str) -> dict:
    """Combine per-seed results → metrics: mean accuracy/loss, std over seeds (ddof=1), each run."""
    acc = np.array([r["accuracy"] for r in results])
    loss = np.array([r["loss"] for r in results])
    first = results[0]
    per_class = {c: (float(np.mean([r["per_class_accuracy"][c] for r in results]))
                     if first["per_class_accuracy"][c] is not None else None) for c in first["per_class_accuracy"]}
    return {
        "accuracy": float(acc.mean()), "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
        "loss": float(loss.mean()), "n": int(len(first["labels"])), "split": split, "model": first["model"],
        "n_train": first["n_train"], "n_seeds": len(results), "per_class_accuracy": per_class,
        "runs": [{"seed": r["seed"], "accuracy": r["accuracy"], "loss": r["loss"]} for r in results],
    }


#: the keys of metrics/<name>.json: small and flat, so `dvc metrics show/diff` fit a terminal
FLAT_KEYS = ("accuracy", "accuracy_std", "n_train")
#: the accuracy with the test split's label decisions applied (docs/methods.md §5.3): a person's
#: reviewed labels where decided, flagged test images left out otherwise
ASIDE_KEYS = ("accuracy_reviewed", "accuracy_unflagged", "n_set_aside")
#: the keys of metrics_dir/<name>.json: few and short, so `dvc metrics show` stays within 120 columns
#: (ci_low, ci_high and n_set_aside live in plots_dir/evaluate_<name>.json, the CLI line and the report)
METRIC_KEYS = (*FLAT_KEYS, "accuracy_reviewed", "accuracy_unflagged", "diff", "p", "verdict")


def leaked_ids(flags_csv) -> np.ndarray:
    """The val/test ids with a copy in train (issues.json beside flags.csv: leakage pairs) → int [L]."""
    path = Path(flags_csv).parent / "issues.json" if flags_csv is not None else None
    if path is None or not path.exists():
        return np.zeros(0, np.int64)
    from pipeline.formats.jsonfile import read_json

    info = read_json(path, "not found", "re-run `clean flag`")
    lk = info.get("leakage") or info.get("duplicate", {}).get("leakage") or {}
    return np.unique(np.asarray([p["eval_id"] for p in lk.get("pairs", [])], np.int64))


def set_aside(ids, labels, flags_csv=None, decisions=None, classes=None, paths=None, manifest="the manifest"):
    """The test split's label decisions → (labels int [M] to score against, keep bool [M], key).

    ids, labels: int [M] the split's images and given labels. decisions.csv rows about these ids
    win: relabel → the reviewed label, drop → left out, keep → the given label; a decision follows
    its image (`paths`: {id: path} of the manifest evaluated, pipeline/decisions.py). The images
    flags.csv calls label issues (its val/test rows, `clean flag`) without a decision are left
    out, and so are the images with a copy in train (:func:`leaked_ids`: a leaked test image
    inflates whichever version trained on its copy, so versions are compared without them).
    key: "accuracy_reviewed" when a decision touched the split, "accuracy_unflagged" when only
    flags / leakage did, None when no file says anything about it (keep all, labels as given).
    """
    ids = np.asarray(ids, np.int64)
    labels = np.asarray(labels, np.int64).copy()
    keep = ~np.isin(ids, leaked_ids(flags_csv))
    key = None if keep.all() else "accuracy_unflagged"
    if flags_csv is not None and Path(flags_csv).exists():
        from pipeline.formats.tables import read_flags

        fl = read_flags(flags_csv, heldout=True)
        if "is_label" in fl.columns:
            flagged = set(fl.loc[fl["is_label"].astype(bool), "id"].tolist())
            keep &= ~np.isin(ids, list(flagged))
            if "split" in fl.columns:  # a flags.csv with val/test rows
                key = "accuracy_unflagged"
    if decisions is not None and classes is not None:
        from pipeline.decisions import read_decisions

        decided = read_decisions(decisions, classes, paths, manifest)
        pos = {int(i): k for k, i in enumerate(ids.tolist())}
        mine = [(pos[i], d) for i, d in decided.items() if i in pos]
        for k, d in mine:
            keep[k] = d["action"] != "drop"
            if d["action"] == "relabel":
                labels[k] = d["label"]
        key = "accuracy_reviewed" if mine else key
    return labels, keep, key


def details_path(plots_dir: str | Path, name: str) -> Path:
    """plots_dir/evaluate_<name>.json: per-class accuracy and every seed's run (not a DVC metric)."""
    return Path(plots_dir) / f"evaluate_{name}.json"


def evaluate(model_dir: str | Path, manifest: str | Path, name: str, metrics_dir: str | Path,
             plots_dir: str | Path, split: str = "test", device: str = "auto", batch_size: int = 512,
             progress=None, baseline: str | None = None, flags_csv=None, decisions=None) -> dict:
    """Evaluate `model_dir` (and its other-seed runs) on `split` of `manifest`.

    Writes `metrics_dir/<name>.json` — small and flat, so `dvc metrics show/diff` fit 120
    columns: accuracy (mean over seeds), accuracy_std, n_train, and with `baseline` (another
    version's name, e.g. "base") the verdict against it over the seeds: diff, p, verdict
    (pipeline/verdict.py); with `flags_csv` / `decisions` (their test rows) also the accuracy
    with the split's label decisions applied (:func:`set_aside`: accuracy_reviewed or
    accuracy_unflagged) — plus `plots_dir/evaluate_<name>.json` (everything: the verdict's
    ci_low / ci_high, n_set_aside, loss [nats], n, n_seeds, per-class accuracy, every run) and `plots_dir/confusion_<name>.csv` (actual,predicted of the
    first seed's model). Returns the full metrics dict (flat keys + per_class_accuracy + runs).
    """
    import pandas as pd

    from pipeline.formats.manifest import SPLITS, read_manifest
    from pipeline.models import check_fits_data, load_trained

    if split not in SPLITS:
        raise CleanError(f"--split {split!r} is not a split; use one of {', '.join(SPLITS)}")
    device = resolve_device(device)
    dirs = run_dirs(model_dir)
    _, cfg = load_trained(dirs[0], "cpu")
    check_fits_data(cfg, manifest, dirs[0])
    df = read_manifest(manifest, cfg["classes"])
    n = int((df["split"] == split).sum())
    if progress:
        progress("start", desc=f"evaluate {name}", total=n * len(dirs))
    results = [evaluate_model(d, manifest, split, device, batch_size, df=df, progress=progress) for d in dirs]
    if progress:
        progress("end")
    metrics = summarize_runs(results, split)
    metrics.update(_aside_accuracy(results, flags_csv, decisions, cfg["classes"],
                                   dict(zip(df["id"].tolist(), df["path"].tolist())), manifest))
    names = np.asarray(results[0]["classes"], dtype=object)
    write_frame(Path(plots_dir) / f"confusion_{name}.csv",
                pd.DataFrame({"actual": names[results[0]["labels"]], "predicted": names[results[0]["pred"]]}))
    if baseline is not None:
        metrics.update(_versus(plots_dir, baseline, metrics))
    write_json(details_path(plots_dir, name), metrics)
    write_json(Path(metrics_dir) / f"{name}.json",
               {k: metrics[k] for k in METRIC_KEYS if k in metrics})
    return metrics


def _aside_accuracy(results: list[dict], flags_csv, decisions, classes, paths, manifest) -> dict:
    """{accuracy_reviewed | accuracy_unflagged: mean over seeds, its _std and _runs, n_set_aside}
    (empty when neither flags nor decisions say anything about the split)."""
    first = results[0]
    labels, keep, key = set_aside(first["ids"], first["labels"], flags_csv, decisions, classes, paths, manifest)
    if key is None or not keep.any():
        return {}
    accs = np.array([float((r["pred"][keep] == labels[keep]).mean()) for r in results])
    return {key: float(accs.mean()), f"{key}_std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
            "n_set_aside": int((~keep).sum()), "n_leaked": int(np.isin(first["ids"], leaked_ids(flags_csv)).sum()),
            f"{key}_runs": [float(a) for a in accs]}


def _versus(plots_dir, baseline: str, metrics: dict) -> dict:
    """The verdict of this version against `baseline` over the seeds (its runs in plots_dir)."""

    base = read_json(details_path(plots_dir, baseline), f"not found; evaluate the {baseline} version first "
                     f"(clean evaluate --name {baseline})", f"re-run `clean evaluate --name {baseline}`")
    try:
        base_acc = [float(r["accuracy"]) for r in base["runs"]]
    except (KeyError, TypeError, ValueError):
        raise CleanError(f"{details_path(plots_dir, baseline)}: no per-seed runs; re-run `clean evaluate --name "
                         f"{baseline}`") from None
    return {"baseline": baseline, **compare_runs([r["accuracy"] for r in metrics["runs"]], base_acc)}
