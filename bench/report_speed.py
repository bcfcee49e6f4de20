"""Time `clean report` at Fashion-MNIST size: 60k scored training samples, 10k test images.

Uses the real pipeline outputs when they are there (data/manifest.csv, scores/scores.csv, ...
in the current folder, or --root); otherwise writes synthetic ones of the same shape into a
temp folder: an IDX file of 60k 28×28 images (manifest paths `<idx>#i`), scores.csv with every
score column, flags.csv (5 % flagged), dynamics.npz (15 epochs × 60k, 256 tracked), metrics
and confusion data of two versions, a sweep summary, a prune summary and a second model's scores (top-k overlap).

    python bench/report_speed.py [--n 60000] [--keep DIR] [--root DIR]

Prints the seconds and the size of reports/index.html; the targets are ≤ 30 s and ≤ 20 MB.
"""
from __future__ import annotations

import argparse
import gzip
import json
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot"]
SCORES = ["loss", "grad_norm", "el2n", "margin", "aum", "forgetting", "confidence", "variability", "self_influence"]


def _images(n: int, labels: np.ndarray, rng) -> np.ndarray:
    """uint8 [n, 28, 28]: a class-shaped bright blob (position/size/aspect by class) plus noise."""
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)
    out = np.empty((n, 28, 28), np.uint8)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        cy, cx = 10 + (c % 3) * 4, 8 + (c // 3) * 4
        ry, rx = 5 + (c % 4) * 2, 4 + (c % 5) * 1.5
        base = np.exp(-(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) ** 2) * 230
        for s in range(0, idx.size, 4096):
            part = idx[s:s + 4096]
            noise = rng.normal(0, 18, size=(part.size, 28, 28)).astype(np.float32)
            shift = rng.integers(-2, 3, size=part.size)
            imgs = np.stack([np.roll(base, int(d), axis=1) for d in shift]) + noise
            out[part] = np.clip(imgs, 0, 255).astype(np.uint8)
    return out


def _write_idx(path: Path, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr, np.uint8)
    data = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    path.write_bytes(gzip.compress(data, compresslevel=1, mtime=0))


def make_inputs(root: Path, n: int = 60_000, n_test: int = 10_000, epochs: int = 15, seed: int = 0) -> dict:
    """Write synthetic pipeline outputs of Fashion-MNIST shape under `root`; returns build_report kwargs."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    data.mkdir(exist_ok=True)
    y_tr, y_te = rng.integers(0, 10, n), rng.integers(0, 10, n_test)
    _write_idx(data / "train-images-idx3-ubyte.gz", _images(n, y_tr, rng))
    _write_idx(data / "t10k-images-idx3-ubyte.gz", _images(n_test, y_te, rng))
    noisy = rng.random(n) < 0.05
    label = np.where(noisy, (y_tr + rng.integers(1, 10, n)) % 10, y_tr)
    ids = np.arange(n + n_test)
    split = np.where(rng.random(n) < 0.1, "val", "train")
    man = pd.DataFrame({
        "id": ids, "path": [f"train-images-idx3-ubyte.gz#{i}" for i in range(n)]
        + [f"t10k-images-idx3-ubyte.gz#{i}" for i in range(n_test)],
        "label": np.concatenate([label, y_te]), "split": np.concatenate([split, np.full(n_test, "test")]),
        "orig_label": np.concatenate([y_tr, y_te]), "noisy": np.concatenate([noisy, np.zeros(n_test, bool)]).astype(int)})
    man.to_csv(data / "manifest.csv", index=False)
    (data / "classes.json").write_text(json.dumps({"classes": FASHION, "source": "fashion-mnist"}))

    tr = man[man["split"] == "train"].reset_index(drop=True)
    m = len(tr)
    hard = tr["noisy"].to_numpy(bool)
    loss = rng.gamma(1.0, 0.15, m) + hard * rng.gamma(4.0, 0.8, m)
    pred = np.where(hard & (rng.random(m) < 0.8), tr["orig_label"], tr["label"]).astype(int)
    sc = pd.DataFrame({"id": tr["id"], "path": tr["path"], "label": tr["label"], "pred": pred, "loss": loss,
                       "grad_norm": loss * rng.uniform(0.5, 1.5, m), "el2n": np.minimum(1.41, loss / 3),
                       "margin": 3 - 2 * loss + rng.normal(0, 0.3, m), "aum": 2 - loss + rng.normal(0, 0.3, m),
                       "forgetting": rng.poisson(0.3 + hard * 3), "confidence": np.exp(-loss),
                       "variability": rng.uniform(0, 0.3, m), "self_influence": loss ** 2 * 0.01,
                       "orig_label": tr["orig_label"], "noisy": tr["noisy"]})
    scores = root / "scores"
    scores.mkdir(exist_ok=True)
    sc.to_csv(scores / "scores.csv", index=False)
    (scores / "meta.json").write_text(json.dumps({"manifest": str(data / "manifest.csv"), "model": "small_cnn",
                                                 "norm": "l2", "params": "all", "split": "train", "n": m}))
    other = sc[["id", "path", "label", "pred"]].copy()  # a second architecture's scores (figure 4)
    other["grad_norm"] = sc["grad_norm"] * rng.lognormal(0, 0.6, m)
    other["loss"] = sc["loss"] * rng.lognormal(0, 0.4, m)
    other.sample(frac=1.0, random_state=seed).to_csv(scores / "scores_other.csv", index=False)
    z = (loss - np.median(loss)) / (1.4826 * np.median(np.abs(loss - np.median(loss))))
    pd.DataFrame({"id": sc["id"], "flagged": (z > 3.5).astype(int), "rule": "mad z(loss) > 3.5",
                  "value": z}).to_csv(scores / "flags.csv", index=False)

    mdir = root / "models" / "base"
    mdir.mkdir(parents=True, exist_ok=True)
    tpos = np.sort(rng.choice(m, 256, replace=False))
    spread = np.linspace(0.3, 2.0, epochs)[:, None]
    tg = np.exp(rng.normal(-1.0 - np.arange(epochs)[:, None] * 0.15, spread, (epochs, 256))).astype(np.float32)
    np.savez(mdir / "dynamics.npz", ids=tr["id"].to_numpy(), labels=tr["label"].to_numpy(),
             lr=np.full(epochs, 1e-3), loss=rng.random((epochs, m), np.float32),
             margin=rng.normal(size=(epochs, m)).astype(np.float32), p_label=rng.random((epochs, m), np.float32),
             correct=rng.random((epochs, m)) > 0.2, track_ids=tr["id"].to_numpy()[tpos], track_grad_norm=tg)

    metrics, plots = root / "metrics", root / "plots"
    metrics.mkdir(exist_ok=True)
    plots.mkdir(exist_ok=True)
    names = np.asarray(FASHION)
    for name, acc in (("base", 0.885), ("pruned", 0.893)):
        wrong = rng.random(n_test) > acc
        p = np.where(wrong, (y_te + rng.integers(1, 10, n_test)) % 10, y_te)
        pd.DataFrame({"actual": names[y_te], "predicted": names[p]}).to_csv(plots / f"confusion_{name}.csv", index=False)
        (metrics / f"{name}.json").write_text(json.dumps({
            "accuracy": float((p == y_te).mean()), "loss": 0.33, "n": n_test, "model": "small_cnn", "split": "test",
            "n_train": m, "accuracy_std": 0.002, "runs": [{"seed": s, "accuracy": acc} for s in range(3)],
            "per_class_accuracy": {c: float((p[y_te == i] == i).mean()) for i, c in enumerate(FASHION)}}))
    sweep = root / "sweep"
    sweep.mkdir(exist_ok=True)
    rows = []
    for s, off in (("random", 0.0), ("max-gradient", -0.01), ("non-extreme", 0.004), ("gradient-cdf", 0.002)):
        for keep in (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0):
            rows.append((s, keep, 0.89 - 0.12 * (1 - keep) ** 3 + off * (1 - keep), 0.004, 3, int(keep * m)))
    pd.DataFrame(rows, columns=["strategy", "keep", "accuracy_mean", "accuracy_std", "n_seeds", "n_kept"]).to_csv(
        sweep / "summary.csv", index=False)
    prune = root / "prune"
    prune.mkdir(exist_ok=True)
    (prune / "summary.json").write_text(json.dumps({"n_total": m, "n_kept": int(m * 0.95),
                                                    "label_entropy": {"kept": 2.297, "all": 2.302, "uniform": 2.3026}}))
    (root / "params.yaml").write_text("data:\n  source: fashion-mnist\n  root: data\nmodel:\n  name: small_cnn\n"
                                      "train:\n  epochs: 15\n")
    return dict(manifest=data / "manifest.csv", scores_csv=scores / "scores.csv", flags_csv=scores / "flags.csv",
                metrics_dir=metrics, plots_dir=plots, sweep_summary=sweep / "summary.csv",
                dynamics=mdir / "dynamics.npz", params=root / "params.yaml", prune_summary=prune / "summary.json",
                compare_scores=scores / "scores_other.csv")


def real_inputs(root: Path) -> dict | None:
    """build_report kwargs for real pipeline outputs under `root`, or None if there are none."""
    if not ((root / "scores" / "scores.csv").exists() and (root / "data" / "manifest.csv").exists()):
        return None
    return dict(manifest=root / "data/manifest.csv", scores_csv=root / "scores/scores.csv",
                flags_csv=root / "scores/flags.csv", metrics_dir=root / "metrics", plots_dir=root / "plots",
                sweep_summary=root / "sweep/summary.csv", dynamics=root / "models/base/dynamics.npz",
                params=root / "params.yaml", prune_summary=root / "prune/summary.json")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=60_000, help="synthetic training samples (default 60000)")
    ap.add_argument("--root", type=Path, default=None, help="use real pipeline outputs under this folder")
    ap.add_argument("--keep", type=Path, default=None, help="write synthetic inputs + report here and keep them")
    a = ap.parse_args()

    from pipeline.stages.report import report as build_report

    kw = real_inputs(a.root) if a.root else None
    tmp = None
    if kw is None:
        if a.root:
            print(f"no real outputs under {a.root} (scores/scores.csv, data/manifest.csv); using synthetic ones")
        root = a.keep or Path(tempfile.mkdtemp(prefix="report_speed_"))
        tmp = None if a.keep else root
        t = time.perf_counter()
        kw = make_inputs(root, a.n)
        print(f"synthetic inputs: {a.n} training samples in {root} ({time.perf_counter() - t:.1f} s to write)")
        out = root / "reports"
        src = "synthetic"
    else:
        out = a.root / "reports"
        src = f"real ({a.root})"
    try:
        t = time.perf_counter()
        r = build_report(out, **kw)
        sec = time.perf_counter() - t
        mb = r["bytes"] / 1e6
        n = sum(1 for _ in open(kw["scores_csv"])) - 1
        print(f"inputs: {src}; {n} scored samples, {r['n_flagged']} flagged, {r['n_shown']} cards")
        print(f"report: {r['path']}")
        print(f"time: {sec:.2f} s (target <= 30 s)   size: {mb:.2f} MB (target <= 20 MB)")
        bad = [k for k, v in r["sections"].items() if v != "ok"]
        if bad:
            print("sections with notes: " + ", ".join(f"{k} ({r['sections'][k]})" for k in bad))
        return 0 if sec <= 30 and mb <= 20 else 1
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
