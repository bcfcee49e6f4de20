"""Training: one loop for round 1, retraining, seeds and cross-fitting.

`fit` trains on in-memory arrays and records per-epoch, per-sample training dynamics
(loss, margin, correct, p(label)) from each sample's minibatch forward pass, before the
update (as in AUM / forgetting). `train` is the stage: manifest in, model folder out.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import CleanError


@dataclass
class Recipe:
    """Everything that defines a training run (params.yaml `model` + `train` + data.image_size)."""

    model: str = "small_cnn"
    pretrained: bool = False
    weights: str | None = None
    epochs: int = 15
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    step_size: int = 10
    gamma: float = 0.1
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 1
    track: int = 256
    image_size: list | int | None = None

    @classmethod
    def from_params(cls, p: dict) -> "Recipe":
        t, m = p["train"], p["model"]
        return cls(model=m["name"], pretrained=m["pretrained"], weights=m["weights"],
                   image_size=p["data"]["image_size"], seed=t["seeds"][0],
                   **{k: t[k] for k in ("epochs", "batch_size", "optimizer", "lr", "momentum",
                                        "weight_decay", "schedule", "step_size", "gamma",
                                        "device", "checkpoint_every", "track")})


def lr_at(recipe: Recipe, epoch: int) -> float:
    """Learning rate used during `epoch` (0-based), per the schedule."""
    if recipe.schedule == "cosine":
        return recipe.lr * 0.5 * (1 + math.cos(math.pi * epoch / recipe.epochs))
    if recipe.schedule == "step":
        return recipe.lr * recipe.gamma ** (epoch // recipe.step_size)
    return recipe.lr


def _optimizer(recipe: Recipe, params):
    import torch

    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)


def _batch_bounds(n: int, bs: int) -> list[tuple[int, int]]:
    """Batches over n items; a trailing batch of 1 is merged into the previous one (BatchNorm)."""
    bounds = [(s, min(n, s + bs)) for s in range(0, n, bs)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2] = (bounds[-2][0], n)
        bounds.pop()
    return bounds


def channel_stats(images_u8: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images [N,C,H,W], in [0,1] units."""
    x = images_u8.astype(np.float64) / 255.0
    mean = x.mean(axis=(0, 2, 3))
    std = x.std(axis=(0, 2, 3))
    std = np.where(std < 1e-6, 1.0, std)
    return [float(v) for v in mean], [float(v) for v in std]


@dataclass
class FitResult:
    """A trained model plus what happened during training (dynamics arrays are [epochs, N])."""

    model: object
    mean: list
    std: list
    dynamics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    checkpoints: list = field(default_factory=list)
    seconds: float = 0.0


def fit(images: np.ndarray, labels: np.ndarray, num_classes: int, recipe: Recipe,
        val: tuple[np.ndarray, np.ndarray] | None = None, checkpoint_dir: Path | None = None,
        progress=None) -> FitResult:
    """Train `recipe.model` from scratch on uint8 images [N,C,H,W] with int labels [N].

    Returns the model (eval mode, on CPU), normalisation stats, and dynamics:
    loss/margin/p_label float32 [E,N], correct bool [E,N] (N in the order given).
    Checkpoints (safetensors) are written to `checkpoint_dir` every `checkpoint_every` epochs.
    """
    import torch
    import torch.nn.functional as F

    from .device import resolve_device
    from .infer import normalize, predict_logits
    from .models import create_model, save_weights

    n = len(labels)
    if n < 2:
        raise CleanError(f"need at least 2 training images, got {n}")
    device = resolve_device(recipe.device)
    torch.manual_seed(recipe.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    _, c, h, w = images.shape
    model = create_model(recipe.model, num_classes, c, (h, w), recipe.pretrained, recipe.weights).to(device)
    mean, std = channel_stats(images)
    x_all = normalize(images, mean, std, device)
    y_all = torch.as_tensor(np.array(labels, np.int64), device=device)
    opt = _optimizer(recipe, model.parameters())
    gen = torch.Generator().manual_seed(recipe.seed)
    E = recipe.epochs
    dyn = {k: np.zeros((E, n), np.float32) for k in ("loss", "margin", "p_label")}
    dyn["correct"] = np.zeros((E, n), bool)
    # a seeded random subset whose eval-mode last-layer gradient norm is recorded every epoch
    k = min(recipe.track, n)
    track_pos = np.sort(np.random.default_rng(recipe.seed).choice(n, size=k, replace=False)) if k else np.zeros(0, int)
    dyn["track_pos"] = track_pos
    dyn["track_grad_norm"] = np.zeros((E, k), np.float32)
    history, ckpts = [], []
    bounds = _batch_bounds(n, recipe.batch_size)
    t0 = time.perf_counter()
    if progress:
        progress("start", desc="train", total=E * n)
    for epoch in range(E):
        lr = lr_at(recipe, epoch)
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        perm = torch.randperm(n, generator=gen)
        tot_loss = 0.0
        for s, e in bounds:
            idx = perm[s:e]
            idx_d = idx.to(device)
            logits = model(x_all[idx_d])
            yb = y_all[idx_d]
            loss_i = F.cross_entropy(logits.float(), yb, reduction="none")
            loss = loss_i.mean()
            if not torch.isfinite(loss):
                raise CleanError(f"training diverged: the loss became {loss.item()} at epoch {epoch + 1}, "
                                 f"samples {s}-{e}; lower train.lr (now {recipe.lr}) or check the images")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                lf = logits.detach().float()
                z_y = lf.gather(1, yb[:, None])[:, 0]
                other = lf.scatter(1, yb[:, None], float("-inf")).amax(1)
                p_y = torch.softmax(lf, 1).gather(1, yb[:, None])[:, 0]
                i = idx.numpy()
                dyn["loss"][epoch, i] = loss_i.detach().cpu().numpy()
                dyn["margin"][epoch, i] = (z_y - other).cpu().numpy()
                dyn["p_label"][epoch, i] = p_y.cpu().numpy()
                dyn["correct"][epoch, i] = (lf.argmax(1) == yb).cpu().numpy()
            tot_loss += loss.item() * (e - s)
            if progress:
                progress("advance", n=e - s)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": tot_loss / n,
               "train_accuracy": float(dyn["correct"][epoch].mean())}
        if val is not None and len(val[1]):
            vl = predict_logits(model, val[0], mean, std, device=device)
            vy = torch.as_tensor(np.array(val[1], np.int64))
            row["val_loss"] = float(F.cross_entropy(vl, vy).item())
            row["val_accuracy"] = float((vl.argmax(1) == vy).float().mean().item())
        if k:
            from .gradnorm import forward_logits_features, last_layer_norms

            model.eval()
            with torch.no_grad():
                lg, hf = forward_logits_features(model, x_all[torch.as_tensor(track_pos, device=device)])
                dyn["track_grad_norm"][epoch] = last_layer_norms(
                    lg.float(), hf.float(), y_all[torch.as_tensor(track_pos, device=device)], "l2").cpu().numpy()
        history.append(row)
        if progress:
            msg = f"epoch {epoch + 1}/{E}  lr {lr:.3g}  loss {row['train_loss']:.4f}  acc {row['train_accuracy']:.4f}"
            if "val_accuracy" in row:
                msg += f"  val_loss {row['val_loss']:.4f}  val_acc {row['val_accuracy']:.4f}"
            progress("log", message=msg)
        if checkpoint_dir is not None and ((epoch + 1) % recipe.checkpoint_every == 0 or epoch + 1 == E):
            name = f"epoch_{epoch + 1:03d}.safetensors"
            save_weights(model, Path(checkpoint_dir) / name, {"epoch": epoch + 1, "lr": lr})
            ckpts.append({"epoch": epoch + 1, "lr": lr, "file": name})
    if progress:
        progress("end")
    model.eval()
    return FitResult(model.cpu(), mean, std, dyn, history, ckpts, time.perf_counter() - t0)


def train(manifest: str | Path, out_dir: str | Path, recipe: Recipe, seeds: list[int] | None = None,
          progress=None) -> dict:
    """Stage: train on the manifest's `train` split, once per seed (default: [recipe.seed]).

    The first seed's run is the full model folder: out_dir/{model.safetensors, config.json,
    metrics.json, dynamics.npz, checkpoints/}; other seeds go to out_dir/seeds/seed_<s>/
    (model.safetensors, config.json, metrics.json). Returns the first run's metrics dict
    with `runs` (one entry per seed).
    """
    import shutil
    import tempfile
    from dataclasses import replace

    from .dataset import classes_path_for, load_split, read_classes, read_manifest
    from .io import write_json

    manifest, out_dir = Path(manifest), Path(out_dir)
    if not manifest.exists():
        raise CleanError(f"manifest not found: {manifest}; create it with `clean prepare`")
    seeds = list(seeds) if seeds else [recipe.seed]
    info = read_classes(classes_path_for(manifest))
    classes = info["classes"]
    df = read_manifest(manifest, classes)
    tr = load_split(manifest, "train", recipe.image_size, df=df)
    val = load_split(manifest, "val", recipe.image_size, df=df) if (df["split"] == "val").any() else None
    out_dir.mkdir(parents=True, exist_ok=True)
    # runs go to a temp folder and replace the old outputs only when every seed succeeded
    work = Path(tempfile.mkdtemp(prefix=".train.", dir=out_dir))
    work.chmod(0o755)
    try:
        runs = []
        for i, seed in enumerate(seeds):
            run_dir = work / "primary" if i == 0 else work / "seeds" / f"seed_{seed}"
            if progress and len(seeds) > 1:
                progress("log", message=f"seed {seed} ({i + 1}/{len(seeds)})")
            m = _train_one(tr, val, classes, replace(recipe, seed=seed), manifest, run_dir, full=(i == 0),
                           progress=progress)
            runs.append({"seed": seed, **{k: m[k] for k in ("train_accuracy", "val_accuracy", "seconds") if k in m}})
        first = json.loads((work / "primary" / "metrics.json").read_text())
        first["runs"] = runs
        write_json(work / "primary" / "metrics.json", first)
        for name in ("checkpoints", "seeds"):
            if (out_dir / name).exists():
                shutil.rmtree(out_dir / name)
        if (work / "seeds").exists():
            (work / "seeds").rename(out_dir / "seeds")
        (work / "primary" / "checkpoints").rename(out_dir / "checkpoints")
        for f in ("dynamics.npz", "model.safetensors", "config.json", "metrics.json"):
            (work / "primary" / f).replace(out_dir / f)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return first


def _train_one(tr, val, classes, recipe: Recipe, manifest: Path, run_dir: Path, full: bool, progress=None) -> dict:
    """One seed's run into run_dir (dynamics + checkpoints only when `full`). Returns metrics."""
    import torch
    import timm

    from .io import atomic_path, write_json
    from .models import save_weights

    run_dir.mkdir(parents=True, exist_ok=True)
    ck = run_dir / "checkpoints" if full else None
    res = fit(tr.images, tr.labels, len(classes), recipe,
              val=(val.images, val.labels) if val is not None else None, checkpoint_dir=ck, progress=progress)
    final = res.history[-1]
    n = len(tr)
    metrics = {"n_train": n, "epochs": recipe.epochs, "seed": recipe.seed, "seconds": round(res.seconds, 3),
               "samples_per_s": round(recipe.epochs * n / max(res.seconds, 1e-9), 1),
               "train_loss": final["train_loss"], "train_accuracy": final["train_accuracy"]}
    for k in ("val_loss", "val_accuracy"):
        if k in final:
            metrics[k] = final[k]
    _, c, h, w = tr.images.shape
    cfg = {"model": recipe.model, "num_classes": len(classes), "classes": classes,
           "in_chans": int(c), "image_size": [int(h), int(w)], "mean": res.mean, "std": res.std,
           "recipe": asdict(recipe), "manifest": str(manifest), "n_train": n,
           "checkpoints": res.checkpoints, "history": res.history,
           "versions": {"torch": torch.__version__.split("+")[0], "timm": timm.__version__}}
    if full:
        with atomic_path(run_dir / "dynamics.npz") as tmp:
            with open(tmp, "wb") as f:
                dyn = dict(res.dynamics)
                track_ids = tr.ids[dyn.pop("track_pos")]
                np.savez(f, ids=tr.ids, labels=tr.labels, track_ids=track_ids,
                         lr=np.array([r["lr"] for r in res.history], np.float64), **dyn)
    save_weights(res.model, run_dir / "model.safetensors", {"model": recipe.model, "seed": recipe.seed})
    write_json(run_dir / "config.json", cfg)
    write_json(run_dir / "metrics.json", metrics)
    return metrics
