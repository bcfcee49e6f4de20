"""Which remedy recovers the most accuracy? Data Dropout's two-round experiment on Fashion-MNIST.

Round 1 trains on a noisy training subset (symmetric noise at `--rates`), records the training
dynamics (mean pre-update softmax, AUM) and the epoch checkpoints, and scores every sample's
TracIn influence on the validation loss (`val_influence`, all parameters). Round 2 retrains
from scratch (every seed of `--seeds`) on each remedy's dataset version and measures test
accuracy on the untouched official test set:

  none · oracle (drop exactly the noisy) · drop-flagged (the default label rule) · relabel ·
  relabel-or-drop · drop-harmful (val_influence < 0) · drop-flagged-harmful (both) ·
  cleanlab k-fold `confident` dropped (--kfold) · random removal of as many as drop-flagged

    python bench/remedies.py --rates 0.2 0.4 --n-train 4000 --epochs 20 --schedule constant --seeds 0 1 2
    python bench/remedies.py --rates 0.2 --schedule cosine          # the project's default recipe

Prints, per rate, mean ± sd accuracy, the share of the gap none → oracle each remedy
recovers, and Welch's verdict against `none` (pipeline/verdict.py). Every step runs through
the library the stages use (fit, RULES, val_influence, the strategies' functions).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.images import read_idx  # noqa: E402
from pipeline.data.noise import inject_noise  # noqa: E402
from pipeline.params import DEFAULTS  # noqa: E402
from pipeline.registry import RULES  # noqa: E402
from pipeline.scores.dynamics import aum  # noqa: E402
from pipeline.training.fit import fit  # noqa: E402
from pipeline.training.infer import predict_logits  # noqa: E402
from pipeline.training.recipe import Recipe  # noqa: E402
from pipeline.verdict import compare_runs  # noqa: E402

ROOT = Path("/usr/share/datasets/fashion-mnist")


def data(n_train: int, n_val: int, seed: int):
    from sklearn.model_selection import train_test_split

    x = read_idx(ROOT / "train-images-idx3-ubyte.gz")[:, None]
    y = read_idx(ROOT / "train-labels-idx1-ubyte.gz").astype(np.int64)
    idx, rest = train_test_split(np.arange(len(y)), train_size=n_train, stratify=y, random_state=seed)
    val, _ = train_test_split(rest, train_size=n_val, stratify=y[rest], random_state=seed)
    xt = np.array(read_idx(ROOT / "t10k-images-idx3-ubyte.gz")[:, None])
    yt = read_idx(ROOT / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    return np.array(x[np.sort(idx)]), y[np.sort(idx)], np.array(x[np.sort(val)]), y[np.sort(val)], xt, yt


class _Inputs:
    def __init__(self, labels, probs, aum_values):
        self.labels, self._probs, self._aum = labels, probs, aum_values

    def probs(self):
        return self._probs

    def score(self, name):
        return -self._aum, "-aum"


def accuracy(res, xt, yt) -> float:
    return float((predict_logits(res.model, xt, res.mean, res.std).argmax(1).numpy() == yt).mean())


def round2(x, y, keep, recipe, seeds, xt, yt, log, name):
    accs = []
    for s in seeds:
        accs.append(accuracy(fit(x[keep], y[keep], 10, replace(recipe, seed=s, track=0)), xt, yt))
    log(f"  {name}: {np.mean(accs):.4f} ± {np.std(accs, ddof=1) if len(accs) > 1 else 0:.4f} "
        f"({int(keep.sum())} images)")
    return accs


def one_rate(rate, x, y_clean, xv, yv, xt, yt, recipe, seeds, kfold, log):
    from pipeline.rules.confident import flag_confident
    from pipeline.scores.influence import val_influence

    y = inject_noise(y_clean, 10, rate, "symmetric", seed=0)
    noisy = y != y_clean
    out = {"rate": rate, "n_train": len(y), "n_noisy": int(noisy.sum())}
    with tempfile.TemporaryDirectory() as ck:
        t0 = time.perf_counter()
        r1 = fit(x, y, 10, replace(recipe, track=0), checkpoint_dir=Path(ck))
        out["round1_seconds"] = round(time.perf_counter() - t0, 1)
        p = r1.dynamics["probs_sum"] / recipe.probs_epochs
        p /= p.sum(1, keepdims=True)
        res = RULES["confident-dynamics"].fn(_Inputs(y, p, aum(r1.dynamics["margin"])), dict(DEFAULTS["flag"]))
        flagged = res.flagged
        suggested, sp = p.argmax(1), p.max(1)
        t0 = time.perf_counter()
        ckpts = [(Path(ck) / c["file"], float(c["lr"])) for c in r1.checkpoints]
        vi = val_influence(r1.model, ckpts, x, y, xv, yv, r1.mean, r1.std, params="all")
        out["val_influence_seconds"] = round(time.perf_counter() - t0, 1)
    harmful = vi < 0
    prec = lambda f: float((f & noisy).sum() / max(f.sum(), 1))  # noqa: E731
    rec = lambda f: float((f & noisy).sum() / max(noisy.sum(), 1))  # noqa: E731
    out["flags"] = {k: {"n": int(f.sum()), "precision": prec(f), "recall": rec(f)}
                    for k, f in (("label", flagged), ("harmful", harmful), ("label&harmful", flagged & harmful))}
    log(f"rate {rate}: round 1 {out['round1_seconds']}s, val_influence {out['val_influence_seconds']}s; flags "
        + json.dumps(out["flags"]))
    everyone = np.ones(len(y), bool)
    sure = flagged & (sp >= DEFAULTS["prune"]["relabel_min_p"])
    versions = {
        "none": (everyone, y),
        "oracle": (~noisy, y),
        "drop-flagged (label)": (~flagged, y),
        "relabel": (everyone, np.where(flagged, suggested, y)),
        "relabel-or-drop": (~(flagged & ~sure), np.where(sure, suggested, y)),
        "drop-harmful": (~harmful, y),
        "drop-flagged-harmful": (~(flagged & harmful), y),
    }
    if kfold:
        from pipeline.training.crossfit import out_of_sample_probs

        oos = out_of_sample_probs(x, y, 10, replace(recipe, track=0), DEFAULTS["flag"]["folds"], 0)
        versions["cleanlab k-fold dropped"] = (~flag_confident(oos, y).flagged, y)
    rng = np.random.default_rng(0)
    drop_n = int(flagged.sum())
    rand = np.ones(len(y), bool)
    rand[rng.choice(len(y), size=drop_n, replace=False)] = False
    versions["random (same count)"] = (rand, y)
    accs = {}
    for name, (keep, labels) in versions.items():
        accs[name] = round2(x, labels, keep, recipe, seeds, xt, yt, log, name)
    gap = np.mean(accs["oracle"]) - np.mean(accs["none"])
    out["versions"] = {}
    for name, a in accs.items():
        v = compare_runs(a, accs["none"]) if name != "none" else {}
        out["versions"][name] = {"mean": float(np.mean(a)), "sd": float(np.std(a, ddof=1)) if len(a) > 1 else 0.0,
                                 "runs": a, "gap_recovered": (float(np.mean(a) - np.mean(accs["none"])) / gap)
                                 if gap > 0 else None, "verdict_vs_none": v.get("verdict"),
                                 "p_vs_none": v.get("p_value")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.2, 0.4])
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-val", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--schedule", default="constant", choices=["constant", "cosine"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--kfold", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    recipe = replace(Recipe(), epochs=a.epochs, schedule=a.schedule, device="cpu", checkpoint_every=1)
    x, y, xv, yv, xt, yt = data(a.n_train, a.n_val, 0)

    def log(m):
        print(m, flush=True)

    results = []
    for rate in a.rates:
        results.append(one_rate(rate, x, y, xv, yv, xt, yt, recipe, a.seeds, a.kfold, log))
        r = results[-1]
        print(f"\n### {int(rate * 100)} % symmetric noise, {a.schedule} lr, {a.n_train} images, {a.epochs} epochs, "
              f"seeds {a.seeds}\n")
        print("| version | test accuracy (mean ± sd) | share of the gap none → oracle | vs none |")
        print("|---|---|---|---|")
        for name, v in r["versions"].items():
            g = "" if v["gap_recovered"] is None else f"{100 * v['gap_recovered']:.0f} %"
            pv = "" if v["p_vs_none"] is None else f"(p = {v['p_vs_none']:.3g})"
            print(f"| {name} | {v['mean']:.4f} ± {v['sd']:.4f} | {g} | {v['verdict_vs_none'] or ''} {pv} |")
        if a.out:
            a.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
