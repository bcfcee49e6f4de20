"""Is `clean prune`'s predicted change of the mean validation loss on the scale of what retraining
measures? Drop sets that the estimator did not choose, and two it did, each retrained with the
base models' seeds (paired: same seed, same recipe), predicted vs measured.

    clean prepare/train/score/flag/prune in a project folder (any noise.rate), then
    python bench/calibration.py /tmp/proj                # prints a markdown table

Sets (training images removed): the version `clean prune` made (data/pruned.csv), and — drawn
with a fixed seed — every planted noisy image and two random halves of them (noise.rate > 0),
a random 10 %, a random 10 % of clean images, half of class 3 and half of class 8 (clean images),
and the 10 % the importance ranks most harmful / most helpful (selected by the estimator itself, so
their predictions are expected to over-shoot: the largest of noisy estimates).

predicted = mean over the seeds' models of Σ_{i removed} e_m(i) from scores/attribution.npz (what
`clean prune` reports); `4·raw` = the former constant calibration (CALIBRATION = 4 on the raw TRAK
effect e_m / calibration_m) for comparison. measured = mean over seeds of (mean val loss of the model
retrained without the set − the base model's of the same seed), on the reference rows.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load(work: Path):
    """→ (train split, val split, reference mask of val, cfg, base models, attribution dict, noisy, removed)."""
    import pandas as pd

    from pipeline.data.dataset import load_split
    from pipeline.effect import positions, read_attribution
    from pipeline.formats.manifest import read_manifest
    from pipeline.models import load_trained, run_dirs

    runs = [load_trained(d) for d in run_dirs(work / "models/base")]
    cfg = runs[0][1]
    df = read_manifest(work / "data/manifest.csv", cfg["classes"])
    tr = load_split(work / "data/manifest.csv", "train", cfg["image_size"], in_chans=cfg["in_chans"], df=df)
    va = load_split(work / "data/manifest.csv", "val", cfg["image_size"], in_chans=cfg["in_chans"], df=df)
    a = read_attribution(work / "scores/attribution.npz")
    a["effects"] = a["effects"][:, positions(a["ids"], np.asarray(tr.ids, np.int64), work)]
    sc = pd.read_csv(work / "scores/scores.csv").set_index("id").loc[tr.ids]
    noisy = sc["noisy"].to_numpy().astype(bool) if "noisy" in sc else np.zeros(len(tr.ids), bool)
    removed = ~np.isin(tr.ids, pd.read_csv(work / "data/pruned.csv")["id"].to_numpy())
    return tr, va, np.isin(va.ids, a["val_ids"]), cfg, [m for m, _ in runs], a, noisy, removed


def drop_sets(e: np.ndarray, y: np.ndarray, noisy: np.ndarray, removed: np.ndarray) -> dict[str, np.ndarray]:
    """name → bool [N] removed (see the module doc)."""
    rng = np.random.default_rng(123)
    n, n10 = len(e), int(round(0.1 * len(e)))

    def mask(idx):
        d = np.zeros(n, bool)
        d[idx] = True
        return d

    nz, cl = np.flatnonzero(noisy), np.flatnonzero(~noisy)
    sets = {"the version (clean prune)": removed} if removed.any() else {}
    if len(nz):
        sets.update({"every planted noisy image": mask(nz),
                     "half of them (a)": mask(rng.choice(nz, len(nz) // 2, False)),
                     "half of them (b)": mask(rng.choice(nz, len(nz) // 2, False))})
    sets["random 10 %"] = mask(rng.choice(n, n10, False))
    sets["random 10 % of clean images"] = mask(rng.choice(cl, n10, False))
    for c in (3, 8):
        cc = np.flatnonzero((y == c) & ~noisy)
        sets[f"half of class {c}"] = mask(rng.choice(cc, len(cc) // 2, False))
    order = np.argsort(e)
    sets["10 % most harmful (selected by it)"] = mask(order[:n10])
    sets["10 % most helpful (selected by it)"] = mask(order[-n10:])
    return sets


def main() -> None:
    import torch
    import torch.nn.functional as F
    from scipy.stats import spearmanr

    from pipeline.config import Recipe
    from pipeline.training.fit import fit
    from pipeline.training.infer import predict_logits

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tr, va, ref, cfg, models, att, noisy, removed = load(a.work)
    y, yv = np.asarray(tr.labels, np.int64), torch.as_tensor(np.asarray(va.labels, np.int64)[ref])
    recipe = replace(Recipe(**{k: v for k, v in cfg["recipe"].items() if k in Recipe.__dataclass_fields__}),
                     device="cpu", workers=0)

    def val_loss(model):
        lg = predict_logits(model, va.images[ref], cfg["mean"], cfg["std"], device="cpu")
        return float(F.cross_entropy(lg.double(), yv).item())

    base = [val_loss(m) for m in models]
    cache = a.work / "calibration"
    cache.mkdir(exist_ok=True)

    def measure(drop):
        f = cache / (hashlib.sha1(np.flatnonzero(drop).tobytes()).hexdigest()[:12] + ".json")
        if not f.exists():
            out = [val_loss(fit(tr.images[~drop], y[~drop], len(cfg["classes"]), replace(recipe, seed=s)).model) - b
                   for s, b in enumerate(base)]
            f.write_text(json.dumps(out))
        return np.array(json.loads(f.read_text()))

    e = att["effects"]
    raw = e / att["calibration"].reshape(-1, 1)
    t0 = time.perf_counter()
    sets = drop_sets(e.mean(0), y, noisy, removed)
    rows = [(name, int(d.sum()), measure(d), e[:, d].sum(1), 4 * raw[:, d].sum(1)) for name, d in sets.items()]
    print(f"\n{a.work}: N = {len(y)}, {int(noisy.sum())} planted noisy, 1/r̄ per model "
          f"{np.round(att['calibration'], 1).tolist()}, {len(base)} seeds, {time.perf_counter() - t0:.0f} s\n")
    print("| drop set | n | measured (± sd over seeds) | predicted (± sd over models) | measured / predicted "
          "| 4·raw |")
    print("|---|---|---|---|---|---|")
    for name, n, m, p, old in rows:
        print(f"| {name} | {n} | {m.mean():+.4f} ± {m.std(ddof=1):.4f} | {p.mean():+.4f} ± {p.std(ddof=1):.4f} "
              f"| {m.mean() / p.mean():.2f} | {old.mean():+.4f} |")
    indep = [r for r in rows if "selected" not in r[0]]
    for label, rs in (("sets it did not select", indep), ("all sets", rows)):
        m = np.array([r[2].mean() for r in rs])
        fit_ = {k: np.array([r[j].mean() for r in rs]) for k, j in (("predicted", 3), ("4·raw", 4))}
        print(f"\n{label}: Spearman {spearmanr(fit_['predicted'], m).statistic:.2f}; least-squares slope measured / "
              + ", ".join(f"{k} {(p @ m) / (p @ p):.2f}" for k, p in fit_.items()))


if __name__ == "__main__":
    main()
