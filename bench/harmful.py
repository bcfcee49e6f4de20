"""Is `harmful` (val_influence < 0) noise on clean data, and does a stricter rule help?

Reads a project folder after `dvc repro score` (models/base with its epoch checkpoints,
data/manifest.csv, scores/scores.csv) and compares, on the training images:

  sign       val_influence < 0 (the `harmful` issue type, docs/methods.md §2)
  t-test     the influence on each of K random validation groups (same checkpoints, `all`
             parameters, pipeline.scores.influence); harmful when mean / (sd / √K) < −t₀.₉₅(K−1)
  MAD cuts   val_influence < median − c · 1.4826 · MAD

printing the share flagged and, when the manifest has a `noisy` column (noise.rate > 0),
precision and recall against the injected noise:

    git clone . /tmp/h && cd /tmp/h && dvc repro score && python bench/harmful.py /tmp/h
    (and the same with `-S noise.rate=0.2`, e.g. sed on params.yaml, for the noisy case)
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import pandas as pd
    import torch
    from scipy import stats

    from pipeline.data.stream import open_split
    from pipeline.models import load_trained, load_weights
    from pipeline.scores.influence import grad_dots, val_gradient
    from pipeline.training.infer import normalize

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, cfg = load_trained(a.work / "models/base", "cpu")
    man = a.work / "data/manifest.csv"
    tr = open_split(man, "train", cfg["image_size"], cfg["in_chans"])
    va = open_split(man, "val", cfg["image_size"], cfg["in_chans"])
    xt, yt = normalize(tr.images, cfg["mean"], cfg["std"], "cpu"), torch.as_tensor(tr.labels)
    xv, yv = normalize(va.images, cfg["mean"], cfg["std"], "cpu"), torch.as_tensor(va.labels)
    group = np.random.default_rng(0).permutation(len(yv)) % a.groups
    per = np.zeros((a.groups, len(yt)))
    work = copy.deepcopy(model)
    for c in cfg["checkpoints"]:
        load_weights(work, a.work / "models/base/checkpoints" / c["file"])
        work.eval()
        for k in range(a.groups):
            v = val_gradient(work, [(xv[group == k], yv[group == k])], "all")
            per[k] += float(c["lr"]) * grad_dots(work, xt, yt, v, "all").double().numpy()
    t = per.mean(0) / (per.std(0, ddof=1) / np.sqrt(a.groups))
    tcrit = float(stats.t.ppf(0.95, a.groups - 1))
    sc = pd.read_csv(a.work / "scores/scores.csv").set_index("id").loc[tr.ids]
    vi = sc["val_influence"].to_numpy()
    noisy = sc["noisy"].to_numpy().astype(bool) if "noisy" in sc else np.zeros(len(vi), bool)
    med, mad = np.median(vi), 1.4826 * np.median(np.abs(vi - np.median(vi)))
    print(f"{a.work}: {len(vi)} training images, {noisy.sum()} noisy, {len(cfg['checkpoints'])} checkpoints, "
          f"K = {a.groups} validation groups")
    rules = [("sign: val_influence < 0", vi < 0), (f"t-test: t < -{tcrit:.2f}", t < -tcrit)]
    rules += [(f"MAD: < median - {c:g} MAD", vi < med - c * mad) for c in (1, 2, 3.5)]
    for name, f in rules:
        tp = int((f & noisy).sum())
        pr = f"  P {tp / max(f.sum(), 1):.3f}  R {tp / max(noisy.sum(), 1):.3f}" if noisy.any() else ""
        print(f"  {name:<28} {int(f.sum()):6d} flagged ({100 * f.mean():4.1f} %){pr}")


if __name__ == "__main__":
    main()
