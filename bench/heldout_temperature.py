"""Held-out label issues with a temperature fitted on val: tried for issue 20, not adopted (docs/benchmarks.md).

The held-out rule (`flag.heldout_filter_by: noise_posterior`) reads the base models' eval-mode softmax on
val and test, averaged over seeds. Final models are over-confident on their own errors, so on a clean folder
they flag 1.4–2.2 % of the held-out images. A noisy-label model's softmax estimates P(given label | image),
so its temperature can be fitted on the val images' GIVEN labels (no clean labels needed: plain temperature
scaling, one scalar, NLL of the seed-mean softmax). This script compares the noise posterior of the
probabilities as they are and at the fitted temperature, per split, against the planted truth of a finished
`bench/realistic.py` run:

    python bench/realistic.py --gen-seed 2 --work W --candidates "" --skip random,oracle,default
    python bench/heldout_temperature.py --work W --gen-seed 2 --kind pairs
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def seed_logits(work: Path, split: str, df, cfg, dirs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eval-mode logits of every seed's base model on `split` → (ids [M], given labels [M], logits [S, M, C])."""
    from pipeline.data.dataset import load_split
    from pipeline.models import load_trained
    from pipeline.training.infer import predict_logits

    data = load_split(work / "data/manifest.csv", split, cfg["image_size"], in_chans=cfg["in_chans"], df=df,
                      classes=cfg["classes"])
    zs = []
    for d in dirs:
        model, c = load_trained(d, "cpu")
        zs.append(predict_logits(model, data.images, c["mean"], c["std"]).double().numpy())
    return np.asarray(data.ids), np.asarray(data.labels, np.int64), np.stack(zs)


def seed_mean_softmax(z: np.ndarray, tau: float) -> np.ndarray:
    """Softmax of logits z [S, M, C] at temperature tau, averaged over the S seeds → [M, C]."""
    x = z / tau
    x = np.exp(x - x.max(-1, keepdims=True))
    return (x / x.sum(-1, keepdims=True)).mean(0)


def fit_temperature(z: np.ndarray, y: np.ndarray) -> float:
    """The temperature in [0.3, 10] that minimises the NLL of the given labels y [M] under seed_mean_softmax(z)."""
    from scipy.optimize import minimize_scalar

    def nll(t):
        p = seed_mean_softmax(z, t)
        return -np.log(np.maximum(p[np.arange(len(y)), y], 1e-12)).mean()

    return float(minimize_scalar(nll, bounds=(0.3, 10.0), method="bounded").x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="a finished bench/realistic.py work folder")
    ap.add_argument("--gen-seed", type=int, required=True)
    ap.add_argument("--kind", choices=["pairs", "symmetric", "none"], required=True)
    a = ap.parse_args()

    import realistic
    from pipeline.formats.manifest import read_manifest
    from pipeline.models import load_trained, run_dirs
    from pipeline.rules.confident import wrong_label_posterior
    from pipeline.rules.labels import training_noise_matrix

    man = realistic.joined(a.work, realistic.folder_truth(a.work, a.gen_seed, a.kind)).set_index("id")
    df = read_manifest(a.work / "data/manifest.csv")
    dirs = run_dirs(a.work / "models/base")
    _, cfg = load_trained(dirs[0], "cpu")
    noise = training_noise_matrix(a.work / "models/base", df)
    held = {s: seed_logits(a.work, s, df, cfg, dirs) for s in ("val", "test")}
    tau = fit_temperature(held["val"][2], held["val"][1])
    print(f"{a.work} ({a.kind}, generator seed {a.gen_seed}): temperature fitted on val {tau:.3f}")
    print("| probabilities | split | flagged | share | precision | recall |\n|---|---|---|---|---|---|")
    for name, t in (("as is", 1.0), (f"temperature {tau:.2f}", tau)):
        for split, (ids, y, z) in held.items():
            wrong = man.loc[ids, "kind"].isin(["flip", "conflict"]).to_numpy()
            flag = wrong_label_posterior(seed_mean_softmax(z, t), y, noise)[0] > 0.5
            tp = int((flag & wrong).sum())
            p = f"{tp / flag.sum():.3f}" if flag.any() and wrong.any() else "–"
            r = f"{tp / wrong.sum():.3f}" if wrong.any() else "–"
            print(f"| {name} | {split} | {int(flag.sum())} | {flag.mean():.2%} | {p} | {r} |")


if __name__ == "__main__":
    main()
