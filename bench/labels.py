"""Label issues with no k-fold (confident-dynamics, the default rule) vs cleanlab's k-fold
`confident`, on Fashion-MNIST (Debian package `dataset-fashion-mnist`) and clean digits.

For each setting — clean, symmetric 20 % / 40 %, 15 % pair noise between lookalike classes
(T-shirt/top↔Shirt, Pullover↔Coat, Sneaker↔Ankle boot) — trains round 1 with the project's
recipe (small_cnn, Adam, cosine, `--epochs`), once per seed in `--seeds` (the default rule
averages the seeds' mean softmax, as `clean train` with several train.seeds does), then flags
with the registered rules and prints flagged %, precision, recall and seconds:

    python bench/labels.py --n-train 4000 --epochs 20 --seeds 0 --kfold
    python bench/labels.py --digits                          # clean digits: how many flags

Everything runs through the library the stages use: `fit` (which records the mean pre-update
softmax), the RULES registry (`confident-dynamics`, `confident`) and `out_of_sample_probs`.
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

from pipeline.data.images import read_idx  # noqa: E402
from pipeline.data.noise import inject_noise  # noqa: E402
from pipeline.params import DEFAULTS  # noqa: E402
from pipeline.registry import RULES  # noqa: E402
from pipeline.rules.metrics import precision_recall  # noqa: E402
from pipeline.scores.dynamics import aum  # noqa: E402
from pipeline.training.crossfit import out_of_sample_probs  # noqa: E402
from pipeline.training.fit import fit  # noqa: E402
from pipeline.training.recipe import Recipe  # noqa: E402

ROOT = Path("/usr/share/datasets/fashion-mnist")
PAIRS = {0: 6, 6: 0, 2: 4, 4: 2, 7: 9, 9: 7}


def fashion(n_train: int, seed: int):
    from sklearn.model_selection import train_test_split

    x = read_idx(ROOT / "train-images-idx3-ubyte.gz")[:, None]
    y = read_idx(ROOT / "train-labels-idx1-ubyte.gz").astype(np.int64)
    idx, _ = train_test_split(np.arange(len(y)), train_size=n_train, stratify=y, random_state=seed)
    idx = np.sort(idx)
    return np.array(x[idx]), y[idx]


def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    return x, d.target.astype(np.int64)


class _Inputs:
    """What the label rules ask for (pipeline.rules.base.RuleInputs), from in-memory runs."""

    def __init__(self, labels, probs, aum_values, manifest=None):
        self.labels, self._probs, self._aum = labels, probs, aum_values

    def probs(self):
        return self._probs

    def score(self, name):
        assert name == "aum"
        return -self._aum, "-aum"


def run_setting(name, x, y_clean, kind, rate, recipe, seeds, kfold, folds, noise_seed):
    n_classes = int(y_clean.max()) + 1
    if kind == "clean":
        y = y_clean.copy()
    else:
        y = inject_noise(y_clean, n_classes, rate, kind, seed=noise_seed, pairs=PAIRS if kind == "pairs" else None)
    truth = y != y_clean
    t0 = time.perf_counter()
    probs, aums = [], []
    for s in seeds:
        res = fit(x, y, n_classes, replace(recipe, seed=s, track=0))
        probs.append(res.dynamics["probs_sum"] / recipe.probs_epochs)
        aums.append(aum(res.dynamics["margin"]))
    t_train = time.perf_counter() - t0
    p = np.mean(probs, axis=0)
    p /= p.sum(1, keepdims=True)
    cfg = {**DEFAULTS["flag"]}
    rows = []
    t = time.perf_counter()
    r = RULES["confident-dynamics"].fn(_Inputs(y, p, aums[0]), cfg)
    rows.append(_row(name, "confident-dynamics (default)", r.flagged, truth, time.perf_counter() - t,
                     f"+0 trainings ({len(seeds)} seed(s) of round 1)"))
    if kfold:
        t = time.perf_counter()
        oos = out_of_sample_probs(x, y, n_classes, replace(recipe, track=0), folds, 0)
        from pipeline.rules.confident import flag_confident

        r = flag_confident(oos, y)
        rows.append(_row(name, f"confident ({folds}-fold, cleanlab)", r.flagged, truth, time.perf_counter() - t,
                         f"+{folds} trainings"))
    return rows, t_train


def _row(setting, rule, flagged, truth, seconds, cost):
    prec, rec = precision_recall(flagged, truth) if truth.any() else (float("nan"), float("nan"))
    return {"setting": setting, "rule": rule, "n": int(len(truth)), "n_noisy": int(truth.sum()),
            "flagged": int(flagged.sum()), "flagged_pct": 100.0 * flagged.mean(), "precision": prec,
            "recall": rec, "seconds": seconds, "cost": cost}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--subset-seed", type=int, default=0)
    ap.add_argument("--noise-seed", type=int, default=0)
    ap.add_argument("--settings", nargs="+", default=["clean", "sym20", "sym40", "pair15"])
    ap.add_argument("--kfold", action="store_true", help="also cleanlab's k-fold `confident` (flag.folds trainings)")
    ap.add_argument("--digits", action="store_true", help="clean digits (the embedded default dataset) only")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    recipe = replace(Recipe(), epochs=a.epochs, device="cpu")
    specs = {"clean": ("clean", 0.0), "sym20": ("symmetric", 0.2), "sym40": ("symmetric", 0.4),
             "pair15": ("pairs", 0.15)}
    x, y = digits() if a.digits else fashion(a.n_train, a.subset_seed)
    settings = ["clean"] if a.digits else a.settings
    rows = []
    for name in settings:
        kind, rate = specs[name]
        r, t_train = run_setting(("digits " if a.digits else "") + name, x, y, kind, rate, recipe, a.seeds,
                                 a.kfold, DEFAULTS["flag"]["folds"], a.noise_seed)
        print(f"# {name}: round 1 ({len(a.seeds)} seed(s)) {t_train:.0f}s", flush=True)
        rows += r
        for q in r:
            print(json.dumps(q), flush=True)
    print("\n| setting | rule | flagged (% of N) | precision | recall | seconds beyond round 1 | cost |")
    print("|---|---|---|---|---|---|---|")
    for q in rows:
        print(f"| {q['setting']} | {q['rule']} | {q['flagged']} ({q['flagged_pct']:.2f} %) | {q['precision']:.3f} | "
              f"{q['recall']:.3f} | {q['seconds']:.1f} | {q['cost']} |")
    if a.out:
        a.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
