"""How well can ANY rule on a model's predictions find the planted wrong labels? (issue 20, docs/benchmarks.md)

Issue 20 asks for label issues at precision ≥ 0.85 and recall ≥ 0.85 in every split of a folder
with 15 % look-alike (pair) noise. This script bounds what a detector built on this model family
can reach there, on the val and test images (out-of-sample for every model below):

  * `base`   — the models clean trains on the noisy folder (what `clean flag` uses),
  * `oracle` — the same recipe trained on the TRUE training labels (what no user has: the best
    posterior this model family can learn from this many images).

For each it reports precision / recall against the planted flips of

  * clean's held-out rule (cleanlab `find_label_issues`, flag.heldout_filter_by),
  * "prediction ≠ given label",
  * `flag.heldout_filter_by: noise_posterior` (docs/methods.md §2.4: the noise matrix T estimated on
    the base models' training record, the Σ P(wrong) likeliest flagged),
  * the Bayes rule with the PLANTED noise matrix T, the model's probabilities p taken as the true-label
    posterior (flag where argmax_j T[given, j]·p_j(x) ≠ given:
    the most likely true label given the image and the given label is another one),
  * the whole trade-off of the Bayes posterior of a wrong label under the planted T,
    P(true ≠ given | x, given) = 1 − T[g, g]·p_g / Σ_j T[g, j]·p_j: the largest recall at
    precision ≥ 0.85 and the largest precision at recall ≥ 0.85 that any cut on it reaches.

If even the oracle's posterior does not reach (0.85, 0.85), no rule on this model family's
predictions does: what is missing is a better posterior (a stronger model or pretrained
features), not a better rule.

    python bench/realistic.py --gen-seed 1 --work W --candidates "" --skip random,default   # base + oracle
    python bench/label_ceiling.py --work W --gen-seed 1 [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from realistic import PAIRS, folder_truth, joined  # noqa: E402
from realistic import pr as realistic_pr  # noqa: E402

TARGET = 0.85


def noise_matrix(rate: float, c: int = 10) -> np.ndarray:
    """The planted T [C, C] in cleanlab's orientation, T[given, true] = P(given | true): the pairs of
    realistic.PAIRS flip at `rate` (as pipeline.rules.confident.estimate_noise_matrix estimates it)."""
    t = np.eye(c)
    for true, given in PAIRS.items():
        t[true, true], t[given, true] = 1.0 - rate, rate
    return t


def pr(flag: np.ndarray, truth: np.ndarray) -> tuple[float, float, int]:
    """(precision, recall, flagged) of bool flags [N] against bool truth [N] (realistic.pr)."""
    d = realistic_pr(flag, truth)
    return d["precision"], d["recall"], d["n"]


def frontier(score: np.ndarray, truth: np.ndarray) -> dict:
    """Over every cut of `score` (high = wrong): the largest recall at precision ≥ TARGET, the largest
    precision at recall ≥ TARGET, and the cut with the largest min(P, R)."""
    o = np.argsort(-score, kind="stable")
    tp = np.cumsum(truth[o])
    n = np.arange(1, len(o) + 1)
    p, r = tp / n, tp / max(int(truth.sum()), 1)
    ok_p, ok_r = p >= TARGET, r >= TARGET
    best = int(np.argmax(np.minimum(p, r)))
    return {"recall_at_p": float(r[ok_p].max()) if ok_p.any() else 0.0,
            "precision_at_r": float(p[ok_r].max()) if ok_r.any() else 0.0,
            "best_min_pr": (float(p[best]), float(r[best]))}


def measure(work: Path, model: str, man, rate: float, estimated: np.ndarray) -> dict:
    """P/R of every rule above on val and test for work/models/<model>; `estimated`: the noise matrix
    the base models' training record gives (the one `noise_posterior` uses)."""
    from pipeline.rules.confident import noise_posterior, wrong_label_posterior
    from pipeline.rules.labels import heldout_label_issues, heldout_probs

    t = noise_matrix(rate)
    out = {}
    for split in ("val", "test"):
        ids, given, probs = heldout_probs(work / "models" / model, work / "data/manifest.csv", split)
        rows = man.set_index("id").loc[ids]
        assert np.array_equal(rows["given"].to_numpy(), given)
        wrong = rows["kind"].isin(["flip", "conflict"]).to_numpy()
        known = rows["true"].to_numpy() >= 0  # out-of-set images have no true class: left out
        given, probs, wrong = given[known], probs[known], wrong[known]
        clean_rule, _, _ = heldout_label_issues(given, probs)
        pw, best = wrong_label_posterior(probs, given, t, noisy=False)  # p taken as the true-label posterior
        res = {"n": int(len(given)), "n_wrong": int(wrong.sum()),
               "accuracy_true": float((probs.argmax(1) == rows["true"].to_numpy()[known]).mean()),
               "clean rule": pr(np.asarray(clean_rule, bool), wrong),
               "prediction != given": pr(probs.argmax(1) != given, wrong),
               "noise posterior": pr(noise_posterior(probs, given, estimated).flagged, wrong),
               "Bayes (planted T)": pr(best != given, wrong),
               "frontier": frontier(pw, wrong)}
        out[split] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="a finished bench/realistic.py run with models/oracle")
    ap.add_argument("--gen-seed", type=int, required=True)
    ap.add_argument("--kind", default="pairs", choices=["pairs"])
    ap.add_argument("--rate", type=float, default=0.15)
    ap.add_argument("--models", default="base,oracle", help="model folders under work/models, comma-separated")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    man = joined(a.work, folder_truth(a.work, a.gen_seed, a.kind, a.rate))
    from pipeline.formats.manifest import read_manifest
    from pipeline.rules.labels import training_noise_matrix

    est = training_noise_matrix(a.work / "models/base", read_manifest(a.work / "data/manifest.csv"))
    res = {m: measure(a.work, m, man, a.rate, est) for m in a.models.split(",")}
    print(f"{'model':7s} {'split':5s} {'acc(true)':>9s}  {'clean rule P/R':>15s}  {'pred≠given P/R':>15s}  "
          f"{'noise post. P/R':>15s}  "
          f"{'Bayes(T) P/R':>13s}  {'R@P≥.85':>7s}  {'P@R≥.85':>7s}  {'best min(P,R)':>13s}")
    for m, r in res.items():
        for split, x in r.items():
            f = x["frontier"]
            cells = [f"{x[k][0]:.3f} / {x[k][1]:.3f}"
                     for k in ("clean rule", "prediction != given", "noise posterior", "Bayes (planted T)")]
            print(f"{m:7s} {split:5s} {x['accuracy_true']:9.4f}  {cells[0]:>15s}  {cells[1]:>15s}  {cells[2]:>15s}  {cells[3]:>13s}  "
                  f"{f['recall_at_p']:7.3f}  {f['precision_at_r']:7.3f}  {f['best_min_pr'][0]:.3f} / {f['best_min_pr'][1]:.3f}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
