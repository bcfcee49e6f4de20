"""Linear datamodeling score (LDS, Park et al. 2023 "TRAK") of clean's attributions and of the
anchors (traker, dattri), and the group form: predicted vs measured change of the mean
validation loss when 10 % of the training set is dropped.

    python bench/lds.py --data digits --cache /tmp/lds                     # default recipe, 15 epochs
    python bench/lds.py --data fmnist --n-train 4000 --epochs 4 --checkpoint-every 2 --cache /tmp/lds
    python bench/lds.py --data digits --noise 0.1 --subsets 0 --cache /tmp/lds   # group form, noisy

Per world (dataset × noise rate):
1. trains `--seeds` models on the full training set (small_cnn, Adam, cosine; the default recipe
   unless --epochs), with epoch checkpoints;
2. M = `--subsets` random 50 % subsets, one retraining each (seed j), recording the loss of every
   validation image (f(z; θ_S)); cached on disk (`--cache`), a rerun trains only what is missing;
3. the attributions τ(z)_i [V, N], each timed: clean's `tracin` (all parameters, seed 0's
   checkpoints; today's val_influence per validation image), `tracin_seeds` (every seed's
   checkpoints), `tracin_last` (head closed form, every checkpoint), `trak_last` (TRAK on the exact
   head gradients, ensembled over the seeds), `trak` (TRAK on count-sketched all-parameter
   gradients, ensembled over the seeds) — pipeline/scores/attribution.py — and the anchors
   `traker` (the `traker` package, BasicProjector on CPU) and `dattri_trak` (dattri's
   TRAKAttributor, its CPU projector), on the same models;
4. LDS(z) = Spearman over subsets of (Σ_{i∈S} τ(z)_i, −loss_z(θ_S)), mean ± sem over z;
5. group form: 10 % drop sets with a share 0…1 of the default attribution's most harmful (or most
   helpful) images, the rest random; each retrained with every seed; predicted change of the mean
   validation loss = Σ_{i∈D} e_i (e: per-image effect, attribution.trak_mean_effect for the TRAK
   family, mean_z τ(z)_i for TracIn) vs measured (mean over seeds, minus the full-set models');
   Spearman over sets, the least-squares slope measured ≈ slope · predicted and the median ratio
   measured / predicted (the TRAK family's effects carry the pipeline's Gauss–Newton scale 1/r̄,
   attribution.gauss_newton_scale; TracIn's are raw). The slope of the 50 % subsets'
   mean loss on the summed effects (`k_fit` in the JSON) is not a usable calibration: removing half
   the set is far outside the linear regime.
6. the `harmful` candidates on the default attribution's per-model effects: share flagged, and
   precision / recall against the planted noise.

Prints markdown tables (docs/benchmarks.md). Single-threaded (`--threads`).
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

FMNIST = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------------------------------------
# data and trainings (cached)
# ---------------------------------------------------------------------------------------------
def load_world(a):
    """→ (x_train u8 [N,C,H,W], y_train (noisy), noisy [N] bool, x_val u8, y_val)."""
    from pipeline.data.noise import inject_noise

    if a.data == "digits":
        from pipeline.data.stream import open_split
        from pipeline.config import PrepareConfig
        from pipeline.stages.prepare import prepare

        d = Path(a.cache) / "digits_data"
        if not (d / "manifest.csv").exists():
            prepare(d, PrepareConfig(source="digits", val_frac=0.1, test_frac=0.2, seed=0))
        tr, va = open_split(d / "manifest.csv", "train"), open_split(d / "manifest.csv", "val")
        x, y, xv, yv = np.array(tr.images), tr.labels.astype(np.int64), np.array(va.images), va.labels.astype(np.int64)
    else:
        from sklearn.model_selection import train_test_split

        from pipeline.data.images import read_idx

        xa = read_idx(FMNIST / "train-images-idx3-ubyte.gz")[:, None]
        ya = read_idx(FMNIST / "train-labels-idx1-ubyte.gz").astype(np.int64)
        idx, _ = train_test_split(np.arange(len(ya)), train_size=a.n_train + a.n_val, stratify=ya, random_state=0)
        it, iv = train_test_split(idx, test_size=a.n_val, stratify=ya[idx], random_state=0)
        it, iv = np.sort(it), np.sort(iv)
        x, y, xv, yv = np.array(xa[it]), ya[it], np.array(xa[iv]), ya[iv]
    y_noisy = inject_noise(y, 10, a.noise, "symmetric", seed=a.noise_seed) if a.noise > 0 else y
    return x, y_noisy, y_noisy != y, xv, yv


def recipe_of(a):
    from pipeline.training.recipe import Recipe

    r = Recipe(track=0, device="cpu", workers=0)
    if a.epochs:
        r = replace(r, epochs=a.epochs)
    if a.checkpoint_every:
        r = replace(r, checkpoint_every=a.checkpoint_every)
    return r


def val_losses(model, mean, std, xv, yv) -> np.ndarray:
    import torch.nn.functional as F

    from pipeline.training.infer import predict_logits

    logits = predict_logits(model, xv, mean, std)
    return F.cross_entropy(logits.double(), __import__("torch").as_tensor(yv), reduction="none").numpy()


def train_cached(path: Path, x, y, recipe, seed, xv, yv, ckpt=False):
    """Train (or load) one run → dict(loss [V], seconds, and for ckpt=True: state, mean, std, ckpts)."""
    import torch

    from pipeline.training.fit import fit

    f = path.parent / (path.name + ".pt")
    if f.exists():
        return torch.load(f, weights_only=False)
    f.parent.mkdir(parents=True, exist_ok=True)
    ck = path.parent / (path.name + "_ckpt") if ckpt else None
    t = time.perf_counter()
    res = fit(x, y, 10, replace(recipe, seed=seed), checkpoint_dir=ck)
    out = {"loss": val_losses(res.model, res.mean, res.std, xv, yv), "seconds": time.perf_counter() - t}
    if ckpt:
        from safetensors.torch import load_file

        out.update(state={k: v.clone() for k, v in res.model.state_dict().items()}, mean=res.mean, std=res.std,
                   ckpts=[(load_file(str(ck / c["file"])), float(c["lr"])) for c in res.checkpoints])
    torch.save(out, f)
    return out


# ---------------------------------------------------------------------------------------------
# attributions
# ---------------------------------------------------------------------------------------------
def model_with(state, num_classes=10, x=None):
    from pipeline.models import create_model

    m = create_model("small_cnn", num_classes=num_classes, in_chans=x.shape[1], img_size=tuple(x.shape[2:]))
    m.load_state_dict(state)
    return m.eval()


def tracin(models, ckpts, xt, yt, xv, yv, head_only=False):
    """Σ_c lr_c ⟨∇L_i, ∇L_z⟩ [V, N] over checkpoints (per-sample loss gradients, vmap)."""
    import torch

    from pipeline.scores.attribution import head_grads, margin_grads

    out = torch.zeros(len(yv), len(yt), dtype=torch.float64)
    for state, lr in ckpts:
        m = model_with(state, x=xt)

        def lossgrads(x, y):
            gs = []
            for s in range(0, len(y), 256):
                g, f = (head_grads if head_only else margin_grads)(m, x[s:s + 256], y[s:s + 256])
                gs.append(-g * (1 - torch.sigmoid(f))[:, None])  # ∇L = −(1 − p) ∇f
            return torch.cat(gs)

        gv = lossgrads(xv, yv)
        for s in range(0, len(yt), 512):
            out[:, s:s + 512] += lr * (gv @ lossgrads(xt[s:s + 512], yt[s:s + 512]).T).double()
    return out.numpy()


def clean_trak(states, xt, yt, xv, yv, kind, k):
    from pipeline.scores.attribution import features, gauss_newton_scale, trak_mean_effect, trak_scores

    ms = [model_with(s, x=xt) for s in states]
    tr = [features(m, xt, yt, kind, k, seed=j) for j, m in enumerate(ms)]
    tg = [features(m, xv, yv, kind, k, seed=j) for j, m in enumerate(ms)]
    scale = np.array([1 / gauss_newton_scale(t) for t in tr])[:, None]  # the pipeline's calibration
    return trak_scores(tr, tg), scale * trak_mean_effect(tr, tg)[1]  # τ [V, N], per-model effects [M, N] (nats)


def traker_anchor(states, xt, yt, xv, yv, k, tmp):
    import torch
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    m = model_with(states[0], x=xt)
    Path(tmp).mkdir(parents=True, exist_ok=True)
    p = sum(q.numel() for q in m.parameters())
    proj = BasicProjector(grad_dim=p, proj_dim=k, seed=0, proj_type=ProjectionType.normal, device="cpu")
    tk = TRAKer(model=m, task="image_classification", train_set_size=len(yt), save_dir=str(tmp), device="cpu",
                projector=proj, proj_dim=k, use_half_precision=False)
    bs = 256
    for j, s in enumerate(states):
        tk.load_checkpoint(s, model_id=j)
        for a in range(0, len(yt), bs):
            tk.featurize(batch=(xt[a:a + bs], torch.as_tensor(yt[a:a + bs])), num_samples=len(yt[a:a + bs]))
    tk.finalize_features()
    for j, s in enumerate(states):
        tk.start_scoring_checkpoint(exp_name="val", checkpoint=s, model_id=j, num_targets=len(yv))
        for a in range(0, len(yv), bs):
            tk.score(batch=(xv[a:a + bs], torch.as_tensor(yv[a:a + bs])), num_samples=len(yv[a:a + bs]))
    return np.asarray(tk.finalize_scores(exp_name="val")).T.astype(np.float64)  # [V, N]


def dattri_anchor(states, xt, yt, xv, yv, k):
    import torch
    import torch.nn as nn
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    m = model_with(states[0], x=xt)

    def f(params, data):
        image, label = data
        yhat = torch.func.functional_call(m, params, image.unsqueeze(0))
        logp = -nn.functional.cross_entropy(yhat, label.unsqueeze(0))
        return logp - torch.log(1 - torch.exp(logp))

    def prob(params, data):
        image, label = data
        yhat = torch.func.functional_call(m, params, image.unsqueeze(0))
        return torch.exp(-nn.functional.cross_entropy(yhat, label.unsqueeze(0)))

    task = AttributionTask(loss_func=f, model=m, checkpoints=[dict(s) for s in states])
    att = TRAKAttributor(task=task, correct_probability_func=prob, device="cpu",
                         projector_kwargs={"proj_dim": k, "proj_max_batch_size": 32, "proj_seed": 0, "device": "cpu"})
    ld = lambda x, y: DataLoader(TensorDataset(x, torch.as_tensor(y)), batch_size=256, shuffle=False)  # noqa: E731
    att.cache(ld(xt, yt))
    return att.attribute(ld(xv, yv)).T.numpy().astype(np.float64)  # [V, N]


# ---------------------------------------------------------------------------------------------
# measures
# ---------------------------------------------------------------------------------------------
def lds(tau: np.ndarray, masks: np.ndarray, loss: np.ndarray) -> tuple[float, float]:
    """mean ± sem over z of Spearman_j(Σ_{i∈S_j} τ(z)_i, −loss_z(θ_{S_j})). masks [M, N], loss [M, V]."""
    from scipy.stats import rankdata

    pred = masks.astype(np.float64) @ tau.T  # [M, V]
    rp, rl = rankdata(pred, axis=0), rankdata(-loss, axis=0)
    rp, rl = rp - rp.mean(0), rl - rl.mean(0)
    r = (rp * rl).sum(0) / np.sqrt((rp ** 2).sum(0) * (rl ** 2).sum(0) + 1e-300)
    return float(np.nanmean(r)), float(np.nanstd(r) / np.sqrt(np.isfinite(r).sum()))


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def drop_sets(e: np.ndarray, n_drop: int, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """10 % drop sets: share s of the n_drop most harmful (lowest e) or most helpful, rest random."""
    rng = np.random.default_rng(seed)
    order = np.argsort(e)
    harm, help_ = order[:n_drop], order[::-1][:n_drop]
    middle = order[n_drop:-n_drop]
    sets = []
    for name, pool, shares in (("harmful", harm, (1.0, 0.75, 0.5, 0.25)), ("helpful", help_, (0.25, 0.5, 1.0))):
        for s in shares:
            k = int(round(s * n_drop))
            sets.append((f"{name} {s:.2f}", np.concatenate([pool[:k], rng.choice(middle, n_drop - k, replace=False)])))
    for r in range(2):
        sets.append((f"random {r}", rng.choice(len(e), n_drop, replace=False)))
    return sets


def harmful_rules(attr, effect, default, noisy, val_loss: float) -> dict:
    """Share flagged (and precision / recall against the planted noise) of candidate rules on the
    default attribution's per-model effects e [M, N] (< 0: removing the image lowers the val loss)."""
    from scipy import stats

    per = attr.get(default + "_eper")
    e = effect[default]
    from pipeline.rules.influence import NULL_QUANTILE, harm_ratio, harmful_mask

    rules = {"mean < 0": e < 0}
    if per is not None:  # the `harmful` issue type (pipeline/rules/influence.py) on the calibrated effects
        name = f"clean's harmful: every model < 0 and harm > the helpful side's q{NULL_QUANTILE:g}"
        rules[name] = harmful_mask(per)[0]
        rules["every model < 0 and harm ratio > 2 (before)"] = (per < 0).all(0) & (harm_ratio(per, val_loss) > 2)
    if per is not None and len(per) > 1:
        m = len(per)
        t = per.mean(0) / (per.std(0, ddof=1) / np.sqrt(m) + 1e-300)
        rules["every model < 0"] = (per < 0).all(0)
        rules[f"t < -t95({m - 1})"] = t < -stats.t.ppf(0.95, m - 1)
    mad = 1.4826 * np.median(np.abs(e - np.median(e)))
    for c in (3.5, 5.0):
        rules[f"robust z < -{c:g}"] = (e - np.median(e)) / mad < -c
        if per is not None and len(per) > 1:
            rules[f"every model < 0 and robust z < -{c:g}"] = (per < 0).all(0) & ((e - np.median(e)) / mad < -c)
    out = {}
    for name, f in rules.items():
        tp = int((f & noisy).sum())
        out[name] = {"n": int(f.sum()), "share": float(f.mean()), "P": tp / max(int(f.sum()), 1) if noisy.any() else float("nan"),
                     "R": tp / max(int(noisy.sum()), 1) if noisy.any() else float("nan")}
    return out


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=("digits", "fmnist"), default="digits")
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-val", type=int, default=300)
    ap.add_argument("--noise", type=float, default=0.0)
    ap.add_argument("--noise-seed", type=int, default=0)
    ap.add_argument("--subsets", type=int, default=50)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--group-seeds", type=int, default=2, help="seeds per drop set (the first of --seeds)")
    ap.add_argument("--epochs", type=int, default=0, help="0 = the default recipe's")
    ap.add_argument("--checkpoint-every", type=int, default=0)
    ap.add_argument("--proj-dim", type=int, default=1024)
    ap.add_argument("--anchors", nargs="*", default=["traker", "dattri_trak"])
    ap.add_argument("--skip", nargs="*", default=[], help="clean attributions not to compute (e.g. tracin_other_seeds)")
    ap.add_argument("--no-groups", action="store_true", help="skip the drop sets (group form)")
    ap.add_argument("--default", default="trak", help="the attribution whose ranking makes the drop sets")
    ap.add_argument("--cache", default="/tmp/lds")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    world = (f"{a.data}-n{a.noise:g}" + (f"-s{a.noise_seed}" if a.noise_seed else "")
             + (f"-e{a.epochs}" if a.epochs else ""))
    cache = Path(a.cache) / world
    cache.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(f"[{time.strftime('%H:%M:%S')}] {world}: {s}", flush=True)  # noqa: E731

    x, y, noisy, xv, yv = load_world(a)
    N, V = len(y), len(yv)
    recipe = recipe_of(a)
    log(f"N = {N}, V = {V}, noisy {int(noisy.sum())}, epochs {recipe.epochs}, checkpoint every {recipe.checkpoint_every}")
    base = [train_cached(cache / f"base_{s}", x, y, recipe, s, xv, yv, ckpt=True) for s in a.seeds]
    log(f"base: val loss {np.mean([b['loss'].mean() for b in base]):.4f}, {np.mean([b['seconds'] for b in base]):.1f} s/run")
    from pipeline.training.infer import normalize

    mean, std = base[0]["mean"], base[0]["std"]
    xt, xvt = normalize(x, mean, std, "cpu"), normalize(xv, mean, std, "cpu")
    yt = torch.as_tensor(y)
    yvt = torch.as_tensor(yv)

    # --- attributions (cached with their timings) ---
    af = cache / f"attr_k{a.proj_dim}.npz"
    attr = dict(np.load(af, allow_pickle=True)) if af.exists() else {}
    secs = json.loads(str(attr.pop("_secs"))) if "_secs" in attr else {}

    def run(name, fn):
        if name in attr or name in a.skip:
            return
        t = time.perf_counter()
        try:
            out = fn()
        except Exception as exc:  # an anchor that cannot run is reported, not fatal
            log(f"{name} FAILED: {type(exc).__name__}: {exc}")
            secs[name] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
            return
        secs[name] = time.perf_counter() - t
        if isinstance(out, tuple):
            attr[name], attr[name + "_eper"] = out
        else:
            attr[name] = out
        np.savez(af, _secs=json.dumps(secs), **attr)
        log(f"{name}: {secs[name]:.1f} s")

    states = [b["state"] for b in base]
    run("tracin", lambda: tracin(None, base[0]["ckpts"], xt, yt, xvt, yvt))
    run("tracin_other_seeds", lambda: tracin(None, [c for b in base[1:] for c in b["ckpts"]], xt, yt, xvt, yvt))
    run("tracin_last", lambda: tracin(None, [c for b in base for c in b["ckpts"]], xt, yt, xvt, yvt, head_only=True))
    run("trak_last", lambda: clean_trak(states, xt, yt, xvt, yvt, "trak_last", a.proj_dim))
    run("trak", lambda: clean_trak(states, xt, yt, xvt, yvt, "trak", a.proj_dim))
    if "traker" in a.anchors:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            run("traker", lambda: traker_anchor(states, xt, yt, xvt, yvt, a.proj_dim, Path(tmp) / "t"))
    if "dattri_trak" in a.anchors:
        run("dattri_trak", lambda: dattri_anchor(states, xt, yt, xvt, yvt, a.proj_dim))
    if "tracin" in attr and "tracin_other_seeds" in attr:
        attr["tracin_seeds"] = attr["tracin"] + attr["tracin_other_seeds"]
        if isinstance(secs.get("tracin"), float):
            secs["tracin_seeds"] = secs["tracin"] + secs["tracin_other_seeds"]
    p_val = np.exp(-np.mean([b["loss"] for b in base], 0))  # p(label) of each validation image, seed mean
    methods = [m for m in ("tracin", "tracin_seeds", "tracin_last", "trak_last", "trak", "traker", "dattri_trak")
               if m in attr]
    effect = {}
    for m in methods:  # per-image effect of removal on the mean val loss (nats, uncalibrated)
        tau = attr[m]
        effect[m] = attr[m + "_eper"].mean(0) if m + "_eper" in attr else (
            tau.mean(0) if m.startswith("tracin") else ((1 - p_val)[:, None] * tau).mean(0))

    # --- LDS subsets ---
    rows = {}
    if a.subsets:
        masks, losses = [], []
        for j in range(a.subsets):
            mask = np.zeros(N, bool)
            mask[np.random.default_rng(1000 + j).choice(N, N // 2, replace=False)] = True
            r = train_cached(cache / "subsets" / f"s{j:03d}", x[mask], y[mask], recipe, j, xv, yv)
            masks.append(mask)
            losses.append(r["loss"])
            if j % 10 == 9:
                log(f"subset {j + 1}/{a.subsets} ({r['seconds']:.1f} s)")
        masks, losses = np.array(masks), np.array(losses)
        full = np.mean([b["loss"].mean() for b in base])
        for m in methods:
            mu, se = lds(attr[m], masks, losses)
            pred = (~masks).astype(np.float64) @ effect[m]  # removed = the complement
            meas = losses.mean(1) - full
            k, b = np.polyfit(pred, meas, 1)
            rows[m] = {"lds": mu, "lds_sem": se, "seconds": secs.get(m), "k_fit": float(k), "b_fit": float(b)}

    # --- group form ---
    n_drop = int(round(0.1 * N))
    sets = [] if a.no_groups else drop_sets(effect[a.default], n_drop)
    gseeds = a.seeds[:a.group_seeds]
    full_g = np.mean([base[i]["loss"].mean() for i in range(len(gseeds))])
    meas = []
    for name, d in sets:
        keep = np.ones(N, bool)
        keep[d] = False
        import hashlib

        tag = name.replace(" ", "_") + "_" + hashlib.sha1(np.sort(d).tobytes()).hexdigest()[:8]  # the set itself
        rs = [train_cached(cache / "groups" / f"{a.default}_{tag}_s{s}", x[keep], y[keep], recipe, s, xv, yv)
              for s in gseeds]
        meas.append(np.mean([r["loss"].mean() for r in rs]) - full_g)
    meas = np.array(meas)
    if sets:
        log("drop sets: " + ", ".join(f"{n}: {m:+.4f}" for (n, _), m in zip(sets, meas)))
    for m in (methods if sets else []):
        pred = np.array([effect[m][d].sum() for _, d in sets])
        row = rows.setdefault(m, {"seconds": secs.get(m)})
        row["group_spearman"] = spearman(pred, meas)
        row["ratio_raw"] = float(np.median(meas / np.where(pred == 0, np.nan, pred)))
        row["slope_raw"] = float((pred @ meas) / (pred @ pred))  # least squares through 0: measured ≈ slope · predicted
        if m.startswith("trak"):  # the pipeline's calibrated prediction (Gauss–Newton scale)
            row["ratio_pipeline"] = float(np.median(meas / pred))
        if "k_fit" in row:
            cal = row["k_fit"] * pred
            row["ratio_cal"] = float(np.median(meas / cal))
            row["slope_cal"] = float((cal @ meas) / (cal @ cal))
        row["pred_harmful_1"] = float(pred[0])
        if noisy.any():  # the harmful rules against the planted noise
            e = effect[m]
            row["flag_sign_P"] = float(noisy[e < 0].mean()) if (e < 0).any() else float("nan")
            row["flag_sign_share"] = float((e < 0).mean())
    harm = harmful_rules(attr, effect, a.default, noisy, float(np.mean([b["loss"].mean() for b in base])))
    out = {"world": world, "harmful": harm, "N": N, "V": V, "epochs": recipe.epochs, "subsets": a.subsets, "proj_dim": a.proj_dim,
           "seconds_per_training": float(np.mean([b["seconds"] for b in base])), "methods": rows,
           "drop_sets": {n: float(m) for (n, _), m in zip(sets, meas)}, "secs": secs}
    (cache / f"result_k{a.proj_dim}.json").write_text(json.dumps(out, indent=1, default=str))
    print(f"\n### {world}: N = {N}, V = {V}, M = {a.subsets}, {recipe.epochs} epochs, k = {a.proj_dim}, "
          f"{out['seconds_per_training']:.1f} s per full training\n")
    print("| attribution | seconds | LDS (± sem) | group Spearman | slope measured/predicted "
          "| median measured / predicted (TRAK: the pipeline's scale) |")
    print("|---|---|---|---|---|---|")
    for m, r in rows.items():
        s = r.get("seconds")
        s = f"{s:.1f}" if isinstance(s, float) else str(s)
        f = lambda key, fmt: (fmt.format(r[key]) if key in r and r[key] is not None else "—")  # noqa: E731
        print(f"| {m} | {s} | {f('lds', '{:.3f}')} ± {f('lds_sem', '{:.3f}')} | {f('group_spearman', '{:.2f}')} "
              f"| {f('slope_raw', '{:.3g}')} | {f('ratio_pipeline', '{:.2f}')} |")
    print("\n| harmful rule (" + a.default + ") | flagged | share | precision vs planted | recall |\n|---|---|---|---|---|")
    for name, r in harm.items():
        print(f"| {name} | {r['n']} | {r['share']:.4f} | {r['P']:.3f} | {r['R']:.3f} |")
    for m, s in secs.items():
        if isinstance(s, str):
            print(f"- {m}: {s}")


if __name__ == "__main__":
    main()
