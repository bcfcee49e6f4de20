"""Forward loss correction (Patrini et al. 2017) on a `bench/realistic.py` folder (issue 20, tried).

Trains every seed of train.seeds on the folder's noisy manifest (or `--manifest data/pruned.csv`, the
default's drop) with the loss −log((softmax · T)[y]),
T[true, given] = cleanlab's noise matrix estimated from the base models' early-epoch p̄ (the inputs
of the label rule), and prints the test accuracy on the TRUE and GIVEN labels against base.
It patches the training loss in this process only; clean's own training is untouched.

    python bench/realistic.py --gen-seed 1 --work W --candidates "" --skip random,oracle,default
    python bench/forward_correction.py --work W --gen-seed 1 --kind pairs
    python bench/forward_correction.py --work W --gen-seed 1 --kind pairs --name gated-forward --manifest data/pruned.csv
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def noise_matrix(work: Path, manifest: str = "data/manifest.csv") -> np.ndarray:
    """T [K, K] (rows: true class, columns: given label) from the base models' p̄ of `manifest`'s train rows."""
    import pandas as pd
    from cleanlab.count import estimate_py_and_noise_matrices_from_probabilities

    from pipeline.rules.base import seed_mean_probs

    man = pd.read_csv(work / manifest)
    tr = man[man["split"] == "train"]
    p = seed_mean_probs(work / "models/base", tr["id"].to_numpy())
    _, nm, _, _ = estimate_py_and_noise_matrices_from_probabilities(tr["label"].to_numpy(), p)
    return nm.T.astype(np.float32)  # cleanlab: nm[given, true]


def patch_loss(T: np.ndarray) -> None:
    """Replace the per-sample cross-entropy of pipeline/training/fit.py by the forward-corrected one."""
    import torch
    import torch.nn.functional as F

    from pipeline.training import fit

    tt = torch.as_tensor(T)
    real = F.cross_entropy

    def corrected(logits, y, reduction="mean", **kw):
        q = torch.softmax(logits.float(), 1) @ tt.to(logits.device)
        return F.nll_loss(torch.log(q.clamp_min(1e-12)), y, reduction=reduction)

    fit_forward = fit._forward

    def _forward(*a, **k):  # the training batches only: validation keeps the plain loss
        F.cross_entropy = corrected
        try:
            return fit_forward(*a, **k)
        finally:
            F.cross_entropy = real

    fit._forward = _forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--gen-seed", type=int, default=1)
    ap.add_argument("--kind", default="pairs", choices=["pairs", "symmetric", "none"])
    ap.add_argument("--name", default="forward")
    ap.add_argument("--manifest", default="data/manifest.csv",
                    help="the version to retrain, relative to --work (data/pruned.csv: the default's drop, then the loss)")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import realistic as R

    from pipeline.config import load_config
    from pipeline.stages.train import train
    from pipeline.verdict import compare_runs

    T = noise_matrix(a.work, a.manifest)
    np.set_printoptions(precision=3, suppress=True, linewidth=140)
    print("estimated T (rows true, columns given):\n", T)
    out = a.work / "models" / a.name
    if not (out / "config.json").exists():
        cfg = load_config(a.work / "params.yaml")
        patch_loss(T)
        cwd = os.getcwd()
        os.chdir(a.work)  # the manifest's relative image paths
        try:
            train(Path(a.manifest), Path("models") / a.name, cfg.train, seeds=cfg.seeds)
        finally:
            os.chdir(cwd)
    man = R.joined(a.work, R.folder_truth(a.work, a.gen_seed, a.kind))  # realistic.py's default folder shape
    got, base = R.accuracies(a.work, a.name, man), R.accuracies(a.work, "base", man)
    for which in ("true", "given"):
        c = compare_runs(got[which], base[which])
        print(f"{which:5s} test labels: {a.name} {np.mean(got[which]):.4f} ± {np.std(got[which], ddof=1):.4f}, "
              f"base {np.mean(base[which]):.4f} ± {np.std(base[which], ddof=1):.4f}: "
              f"{c['diff']:+.4f}, p {c['p']:.3f}, {c['verdict']}")


if __name__ == "__main__":
    main()
