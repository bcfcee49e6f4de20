"""Label-noise benchmark on Fashion-MNIST (the Debian package `dataset-fashion-mnist`).

Injects symmetric label noise into the training set, trains round 1, and measures
1. how well every score separates mislabelled from clean samples (AUROC),
2. precision / recall / AUROC / wall time of each flag method (cleanlab's including its k-fold
   training), and
3. test accuracy (mean ± std over seeds) after retraining from scratch on: everything (no
   pruning), a random removal of the same size as the best flag method's, drop-flagged for
   each method, and the oracle (exactly the noisy samples removed).

    python bench/noise.py --rates 0.2 0.4 --n-train 10000 --epochs 15 --seeds 0 1 2 --out docs/noise.json

Prints markdown tables (pasted into docs/benchmarks.md). Everything runs through the
library functions the CLI stages use (fit, forward_scores, dynamics_scores, self_influence,
the flag rules, out_of_sample_probs).
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

from pipeline.rules import confident, metrics, outliers, threshold  # noqa: E402
from pipeline.training.crossfit import out_of_sample_probs  # noqa: E402
from pipeline.scores.dynamics import dynamics_scores  # noqa: E402
from pipeline.data.images import read_idx  # noqa: E402
from pipeline.training.infer import predict_logits  # noqa: E402
from pipeline.data.noise import inject_noise  # noqa: E402
from pipeline.scores.compute import forward_scores, self_influence  # noqa: E402
from pipeline.training.fit import fit  # noqa: E402
from pipeline.training.recipe import Recipe  # noqa: E402

ROOT = Path("/usr/share/datasets/fashion-mnist")
LOW_IS_SUSPICIOUS = {"margin", "aum", "confidence"}


def load(n_train: int, seed: int):
    from sklearn.model_selection import train_test_split

    x = read_idx(ROOT / "train-images-idx3-ubyte.gz")[:, None]
    y = read_idx(ROOT / "train-labels-idx1-ubyte.gz").astype(np.int64)
    xt = read_idx(ROOT / "t10k-images-idx3-ubyte.gz")[:, None]
    yt = read_idx(ROOT / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    if n_train < len(y):
        idx, _ = train_test_split(np.arange(len(y)), train_size=n_train, stratify=y, random_state=seed)
        idx = np.sort(idx)
        x, y = x[idx], y[idx]
    return np.array(x), y, np.array(xt), yt


def test_accuracy(res, xt, yt) -> float:
    logits = predict_logits(res.model, xt, res.mean, res.std)
    return float((logits.argmax(1).numpy() == yt).mean())


def retrain(x, y, keep, recipe, seeds, xt, yt):
    accs = [test_accuracy(fit(x[keep], y[keep], 10, replace(recipe, seed=s, track=0)), xt, yt) for s in seeds]
    return {"mean": float(np.mean(accs)), "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
            "runs": accs, "n_train": int(keep.sum())}


def one_rate(rate, x, y_clean, xt, yt, recipe, seeds, folds, methods, log, contamination=0.05, retrain_too=True):
    y = inject_noise(y_clean, 10, rate, "symmetric", seed=0)
    noisy = y != y_clean
    out = {"rate": rate, "n_train": len(y), "n_noisy": int(noisy.sum())}
    with tempfile.TemporaryDirectory() as ck:
        t = time.perf_counter()
        r1 = fit(x, y, 10, recipe, checkpoint_dir=Path(ck))
        t_train = time.perf_counter() - t
        out["round1_seconds"] = t_train
        out["round1_test_accuracy"] = test_accuracy(r1, xt, yt)
        log(f"rate {rate}: round 1 trained in {t_train:.0f}s, test acc {out['round1_test_accuracy']:.4f}")
        scores, times = {}, {}
        for params in ("last", "all"):
            t = time.perf_counter()
            s = forward_scores(r1.model, x, y, r1.mean, r1.std, "l2", params, 512)
            times[f"grad_norm_{params}"] = time.perf_counter() - t
            scores[f"grad_norm_{params}"] = s["grad_norm"]
        for k in ("loss", "el2n", "margin"):
            scores[k] = s[k]
            times[k] = times["grad_norm_last"]
        t = time.perf_counter()
        scores.update(dynamics_scores(r1.dynamics))
        for k in ("aum", "forgetting", "confidence", "variability"):
            times[k] = time.perf_counter() - t  # free: recorded during training
        ckpts = [(Path(ck) / c["file"], c["lr"]) for c in r1.checkpoints]
        t = time.perf_counter()
        scores["self_influence"] = self_influence(r1.model, ckpts, x, y, r1.mean, r1.std, "last", 512)
        times["self_influence"] = time.perf_counter() - t
    aurocs = {}
    for k, v in scores.items():
        oriented = -v if k in LOW_IS_SUSPICIOUS else v
        aurocs[k] = {"auroc": metrics.auroc(oriented, noisy), "seconds_beyond_training": times[k]}
    out["scores"] = aurocs
    log("AUROC: " + ", ".join(f"{k} {a['auroc']:.4f}" for k, a in sorted(aurocs.items(), key=lambda kv: -kv[1]["auroc"])))

    flags = {}
    for m in methods:
        t = time.perf_counter()
        if m.startswith(("mad:", "gmm:")):
            kind, sc = m.split(":", 1)
            v = -scores[sc] if sc in LOW_IS_SUSPICIOUS else scores[sc]
            res = threshold.flag_mad(v, 3.5, sc) if kind == "mad" else threshold.flag_gmm(v, sc)
        elif m == "isolation-forest":
            import torch

            from pipeline.head import forward_logits_features, last_layer_residual, project_last_layer_grads
            from pipeline.training.infer import normalize

            feats = []
            with torch.no_grad():
                for s0 in range(0, len(y), 1024):
                    lg, h = forward_logits_features(r1.model, normalize(x[s0:s0 + 1024], r1.mean, r1.std))
                    yy = torch.as_tensor(y[s0:s0 + 1024])
                    feats.append(project_last_layer_grads(last_layer_residual(lg.double(), yy), h.double(), 256, 0).numpy())
            res = outliers.flag_isolation_forest(np.concatenate(feats), contamination, 0)
        elif m == "confident":
            probs = out_of_sample_probs(x, y, 10, replace(recipe, track=0), folds, seed=0)
            res = confident.flag_confident(probs, y)
        else:
            raise SystemExit(f"unknown method {m}")
        secs = time.perf_counter() - t  # cleanlab's includes its k-fold trainings
        p, r = metrics.precision_recall(res.flagged, noisy)
        flags[m] = {"rule": res.rule, "n_flagged": int(res.flagged.sum()), "precision": p, "recall": r,
                    "auroc": metrics.auroc(res.value, noisy), "seconds": secs, "flagged": res.flagged}
        log(f"flag {m}: {res.flagged.sum()} flagged, precision {p:.3f}, recall {r:.3f}, "
            f"AUROC {flags[m]['auroc']:.4f}, {secs:.0f}s")
    out["flags"] = {k: {kk: vv for kk, vv in v.items() if kk != "flagged"} for k, v in flags.items()}
    if not retrain_too:
        out["test_accuracy"] = {}
        return out

    acc = {}
    everything = np.ones(len(y), bool)
    acc["no pruning"] = retrain(x, y, everything, recipe, seeds, xt, yt)
    acc["oracle"] = retrain(x, y, ~noisy, recipe, seeds, xt, yt)
    best = max((m for m in flags if m != "confident"), key=lambda m: flags[m]["auroc"], default=None)
    out["best_without_kfold"] = best
    if best:
        n_drop = flags[best]["n_flagged"]
        rng = np.random.default_rng(0)
        keep = everything.copy()
        keep[rng.choice(len(y), n_drop, replace=False)] = False
        acc[f"random (same count as {best})"] = retrain(x, y, keep, recipe, seeds, xt, yt)
    for m, f in flags.items():
        acc[f"drop-flagged {m}"] = retrain(x, y, ~f["flagged"], recipe, seeds, xt, yt)
        log(f"retrain drop-flagged {m}: {acc[f'drop-flagged {m}']['mean']:.4f} ± {acc[f'drop-flagged {m}']['std']:.4f}")
    out["test_accuracy"] = acc
    gap = acc["oracle"]["mean"] - acc["no pruning"]["mean"]
    out["gap_oracle_minus_none"] = gap
    for m in flags:
        a = acc[f"drop-flagged {m}"]["mean"] - acc["no pruning"]["mean"]
        out["flags"][m]["recovered_fraction_of_gap"] = a / gap if gap > 0 else None
    return out


def markdown(res: dict) -> str:
    lines = [f"### {int(res['rate'] * 100)} % symmetric noise — {res['n_train']} training images, "
             f"{res['n_noisy']} mislabelled; round 1 {res['round1_seconds']:.0f} s, test acc {res['round1_test_accuracy']:.4f}",
             "", "| score | AUROC (noisy vs clean) | seconds beyond training |", "|---|---|---|"]
    for k, a in sorted(res["scores"].items(), key=lambda kv: -kv[1]["auroc"]):
        lines.append(f"| {k} | {a['auroc']:.4f} | {a['seconds_beyond_training']:.1f} |")
    lines += ["", "| flag method | flagged | precision | recall | AUROC | seconds | gap recovered |", "|---|---|---|---|---|---|---|"]
    for m, f in res["flags"].items():
        rec = f.get("recovered_fraction_of_gap")
        lines.append(f"| {m} | {f['n_flagged']} | {f['precision']:.3f} | {f['recall']:.3f} | {f['auroc']:.4f} | "
                     f"{f['seconds']:.0f} | {'' if rec is None else f'{rec:.0%}'} |")
    lines += ["", "| retrained on | images | test accuracy (mean ± std) |", "|---|---|---|"]
    for k, a in res["test_accuracy"].items():
        lines.append(f"| {k} | {a['n_train']} | {a['mean']:.4f} ± {a['std']:.4f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[0.2, 0.4])
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--methods", nargs="+",
                    default=["gmm:aum", "gmm:loss", "mad:aum", "isolation-forest", "confident"])
    ap.add_argument("--contamination", type=float, default=0.05,
                    help="isolation forest contamination (Chhabra et al. use 0.05; the noise rate is unknown to users)")
    ap.add_argument("--no-retrain", action="store_true", help="only AUROC and flag quality (no retraining)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if not (ROOT / "train-images-idx3-ubyte.gz").exists():
        raise SystemExit("Fashion-MNIST not found: apt-get install -y dataset-fashion-mnist")
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    x, y, xt, yt = load(a.n_train, 0)
    recipe = Recipe(model="small_cnn", epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, optimizer="adam",
                    schedule="cosine", device="cpu", seed=a.seeds[0], checkpoint_every=max(1, a.epochs // 5), track=0)
    log = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True)  # noqa: E731
    log(f"recipe: {recipe}")
    results = []
    for rate in a.rates:
        res = one_rate(rate, x, y, xt, yt, recipe, a.seeds, a.folds, a.methods, log, a.contamination,
                       retrain_too=not a.no_retrain)
        results.append(res)
        print(markdown(res), flush=True)
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps({"recipe": str(recipe), "args": vars(a) | {"out": str(a.out)}, "results": results},
                                        indent=2, default=float))


if __name__ == "__main__":
    main()
