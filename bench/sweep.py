"""The paper's subset-selection experiment (Vodrahalli et al.) on a prepared manifest.

Round 1 trains on the (optionally subsampled) training split and scores it; then, for each
strategy × keep fraction × seed, a model is retrained from scratch on the selected subset
and evaluated on the untouched test split. Same library functions as `clean sweep point`
(select, fit, forward_scores), in one process so the many small runs stay cheap.

    python bench/sweep.py --manifest data/manifest.csv --keeps 0.01 0.05 0.1 0.3 0.5 --seeds 0 1 2
    python bench/sweep.py --manifest /tmp/fm/data/manifest.csv --n-train 10000 --epochs 10

Prints a markdown table (accuracy mean ± std over seeds, and the label entropy of the kept
set) and writes JSON with every run (--out).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.dataset import load_split  # noqa: E402
from pipeline.formats.manifest import classes_path_for, read_classes, read_manifest  # noqa: E402
from pipeline.training.infer import predict_logits  # noqa: E402
from pipeline.scores.compute import forward_scores  # noqa: E402
from pipeline.strategies import label_entropy, select  # noqa: E402
from pipeline.training.fit import fit  # noqa: E402
from pipeline.training.recipe import Recipe  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--n-train", type=int, default=0, help="stratified subsample of the training split (0 = all)")
    ap.add_argument("--strategies", nargs="+", default=["random", "max-gradient", "non-extreme", "gradient-cdf"])
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.3, 0.5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--model", default="small_cnn")
    ap.add_argument("--params", default="all", help="score.params for grad_norm")
    ap.add_argument("--balanced", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    classes = read_classes(classes_path_for(a.manifest))["classes"]
    df = read_manifest(a.manifest, classes)
    tr = load_split(a.manifest, "train", df=df)
    te = load_split(a.manifest, "test", df=df)
    x, y = np.array(tr.images), tr.labels
    if a.n_train and a.n_train < len(y):
        from sklearn.model_selection import train_test_split

        idx, _ = train_test_split(np.arange(len(y)), train_size=a.n_train, stratify=y, random_state=0)
        idx = np.sort(idx)
        x, y = x[idx], y[idx]
    C = len(classes)
    recipe = Recipe(model=a.model, epochs=a.epochs, batch_size=a.batch_size, device="cpu", track=0,
                    checkpoint_every=a.epochs)
    log = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True)  # noqa: E731
    t = time.perf_counter()
    r1 = fit(x, y, C, recipe)
    acc1 = float((predict_logits(r1.model, te.images, r1.mean, r1.std).argmax(1).numpy() == te.labels).mean())
    g = forward_scores(r1.model, x, y, r1.mean, r1.std, "l2", a.params, 256)["grad_norm"]
    log(f"round 1: {len(y)} images, test acc {acc1:.4f}, scored in {time.perf_counter() - t:.0f}s")
    rows = []
    for keep in a.keeps:
        for strat in a.strategies:
            accs, ent = [], None
            for s in a.seeds:
                kept = select(g, y, strat, keep, seed=s, balanced=a.balanced)
                ent = label_entropy(y[kept], C)[0] if ent is None else ent
                res = fit(x[kept], y[kept], C, replace(recipe, seed=s))
                pred = predict_logits(res.model, te.images, res.mean, res.std).argmax(1).numpy()
                accs.append(float((pred == te.labels).mean()))
            row = {"strategy": strat, "keep": keep, "n_kept": int(len(kept)), "accuracy_mean": float(np.mean(accs)),
                   "accuracy_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0, "runs": accs,
                   "label_entropy_kept_seed0": float(ent)}
            rows.append(row)
            log(f"{strat:13s} keep {keep:<5g} n={len(kept):6d}  acc {row['accuracy_mean']:.4f} ± {row['accuracy_std']:.4f}"
                f"  H(kept) {ent:.3f}")
    uniform = float(np.log(C))
    print("\n| keep | n | " + " | ".join(a.strategies) + " |")
    print("|---|---|" + "---|" * len(a.strategies))
    for keep in a.keeps:
        cells = {r["strategy"]: r for r in rows if r["keep"] == keep}
        n = next(iter(cells.values()))["n_kept"]
        print(f"| {keep:g} | {n} | " + " | ".join(
            f"{cells[s]['accuracy_mean']:.4f} ± {cells[s]['accuracy_std']:.4f} (H {cells[s]['label_entropy_kept_seed0']:.2f})"
            for s in a.strategies) + " |")
    print(f"\nround-1 model on all {len(y)} images: test accuracy {acc1:.4f}; H = label entropy of the kept set "
          f"(nats; uniform = {uniform:.2f})")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "round1_accuracy": acc1,
                                     "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
