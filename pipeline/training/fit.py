"""Training: one loop for round 1, retraining, seeds and cross-fitting.

`fit` trains on uint8 images (in memory, or streamed from disk: pipeline/stream.py) and
records per-epoch, per-sample training dynamics (loss, margin, correct, p(label)) from each
sample's minibatch forward pass, before the update (as in AUM / forgetting). `train` is the
stage: manifest in, model folder out.

Under `torchrun` (pipeline/distributed.py) the same loop is data-parallel (DDP): every rank
draws the same permutation, takes its contiguous slice of each global batch, and the loss is
scaled so that DDP's gradient average equals the one-process gradient of the global batch
mean; dynamics rows are gathered on rank 0. On CUDA: mixed precision (`train.amp`),
channels_last, pinned memory and non-blocking copies. State for `--resume`: pipeline/resume.py.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import CleanError

#: where `train` keeps the unfinished work (per-epoch state for --resume) inside out_dir
PARTIAL = ".partial"
#: Recipe fields that never change the numbers (a run may resume with other values)
RESULT_NEUTRAL = ("workers", "cache_max_gb", "device")
AMP = ["auto", "off", "bf16", "fp16"]


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
    amp: str = "auto"          # auto | off | bf16 | fp16 (auto: bf16, else fp16, on CUDA; off on CPU)
    workers: int = 4           # DataLoader worker processes decoding streamed images
    cache_max_gb: float = 4.0  # a decoded training set larger than this is streamed from disk

    @classmethod
    def from_params(cls, p: dict) -> "Recipe":
        t, m = p["train"], p["model"]
        return cls(model=m["name"], pretrained=m["pretrained"], weights=m["weights"],
                   image_size=p["data"]["image_size"], seed=t["seeds"][0],
                   amp=t.get("amp", "auto"), workers=t.get("workers", 4),
                   cache_max_gb=p["data"].get("cache_max_gb", 4.0),
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


def amp_dtype(setting: str, device: str):
    """Autocast dtype for `train.amp` on `device` → torch.bfloat16 | torch.float16 | None (fp32).

    auto: bf16 where the GPU supports it, else fp16 (with a GradScaler); off on CPU.
    bf16 also runs on CPU; fp16 needs CUDA.
    """
    import torch

    cuda = str(device).startswith("cuda")
    if setting not in AMP:
        raise CleanError(f"train.amp = {setting!r} is not allowed; use one of: {', '.join(AMP)}")
    if setting == "off" or (setting == "auto" and not cuda):
        return None
    if setting == "fp16" and not cuda:
        raise CleanError("train.amp = fp16 needs a CUDA GPU; on CPU use train.amp: bf16 or off")
    bf16_ok = not cuda or torch.cuda.is_bf16_supported()
    if setting == "bf16" and not bf16_ok:
        raise CleanError("train.amp = bf16 but this GPU has no bfloat16 support; use fp16 or auto")
    if setting == "auto":
        return torch.bfloat16 if bf16_ok else torch.float16
    return torch.bfloat16 if setting == "bf16" else torch.float16


def _channels_last(device: str) -> bool:
    """NHWC memory format for conv nets: faster on CUDA (tensor cores), no gain on CPU."""
    return str(device).startswith("cuda")


def _batch_bounds(n: int, bs: int) -> list[tuple[int, int]]:
    """Batches over n items; a trailing batch of 1 is merged into the previous one (BatchNorm)."""
    bounds = [(s, min(n, s + bs)) for s in range(0, n, bs)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2] = (bounds[-2][0], n)
        bounds.pop()
    return bounds


def _local_slice(batch: np.ndarray, world: int, rank: int) -> tuple[np.ndarray, float]:
    """This rank's contiguous part of a global batch → (indices, weight).

    A rank left without samples (global batch smaller than the world) runs one sample with
    weight 0, so that every rank still takes part in DDP's gradient all-reduce.
    """
    if world == 1:
        return batch, 1.0
    from pipeline.distributed import even_split

    a, b = even_split(len(batch), world, rank)
    return (batch[a:b], 1.0) if b > a else (batch[:1], 0.0)


def channel_histogram(images, chunk: int = 1024) -> np.ndarray:
    """Per-channel counts of every uint8 value, int64 [C, 256] (exact, independent of order).

    Streamed images are read in batches by the decode workers (and sharded across ranks
    under torchrun, the counts summed).
    """
    from pipeline import distributed as D
    from pipeline.data.stream import is_streamed, iter_batches

    n, c = images.shape[0], images.shape[1]
    hist = np.zeros((c, 256), np.int64)

    def add(xb) -> None:
        xb = np.asarray(xb)
        for ch in range(c):
            hist[ch] += np.bincount(xb[:, ch].reshape(-1), minlength=256)

    if is_streamed(images):
        s, e = D.shard(n, chunk)
        for xb in iter_batches(images, [slice(a, min(e, a + chunk)) for a in range(s, e, chunk)]):
            add(xb)
        return D.all_reduce_sum(hist)
    for a in range(0, n, chunk):
        add(images[a:a + chunk])
    return hist


def channel_stats(images_u8) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images [N,C,H,W] (array or streamed), in [0,1] units."""
    hist = channel_histogram(images_u8).astype(np.float64)
    v = np.arange(256, dtype=np.float64) / 255.0
    total = hist.sum(axis=1)
    mean = (hist * v).sum(axis=1) / total
    std = np.sqrt((hist * (v[None, :] - mean[:, None]) ** 2).sum(axis=1) / total)
    std = np.where(std < 1e-6, 1.0, std)
    return [float(x) for x in mean], [float(x) for x in std]


class _Feed:
    """uint8 batches images[idx] as tensors on `device`: held there once, or streamed."""

    def __init__(self, images, device: str):
        import torch

        from pipeline.data.stream import is_streamed

        self.images, self.device = images, device
        self.cuda = str(device).startswith("cuda")
        self.resident = None
        if not is_streamed(images):
            arr = images if images.flags.writeable else np.array(images)  # torch refuses read-only buffers
            self.resident = torch.as_tensor(arr).to(device)

    def batches(self, keys: list):
        import torch

        from pipeline.data.stream import iter_batches

        if self.resident is not None:
            for k in keys:
                yield self.resident[torch.as_tensor(k, device=self.device)]
            return
        for xb in iter_batches(self.images, keys, pin=self.cuda):
            yield torch.as_tensor(xb).to(self.device, non_blocking=True)

    def take(self, idx: np.ndarray):
        return next(self.batches([idx]))


def _predict(core, images, mean, std, device: str, channels_last: bool, batch_size: int = 512):
    """Eval-mode logits of every image, this rank's shard computed here, all of them on rank 0
    (None elsewhere). One process: identical to `infer.predict_logits`."""
    import torch

    from pipeline import distributed as D
    from pipeline.training.infer import normalize
    from pipeline.data.stream import iter_batches

    core.eval()
    s, e = D.shard(len(images), batch_size)
    out = []
    with torch.inference_mode():
        for xb in iter_batches(images, [slice(a, min(e, a + batch_size)) for a in range(s, e, batch_size)],
                               pin=str(device).startswith("cuda")):
            x = normalize(xb, mean, std, device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(core(x).float().cpu())
    local = torch.cat(out) if out else torch.empty(0)
    parts = D.gather(local)
    return torch.cat([p for p in parts if p.numel()]) if parts is not None else None


def _diverged(value, epoch: int, s: int, e: int, recipe: Recipe) -> CleanError:
    return CleanError(f"training diverged: the loss became {value} at epoch {epoch + 1}, samples {s}-{e}; "
                      f"lower train.lr (now {recipe.lr}) or check the images")


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


def fit(images, labels: np.ndarray, num_classes: int, recipe: Recipe,
        val: tuple | None = None, checkpoint_dir: Path | None = None,
        progress=None, state_dir: Path | None = None, resume: bool = False) -> FitResult:
    """Train `recipe.model` from scratch on uint8 images [N,C,H,W] with int labels [N].

    `images` is an array or streamed images (pipeline/stream.py; same results). Returns the
    model (eval mode, on CPU), normalisation stats, and dynamics: loss/margin/p_label float32
    [E,N], correct bool [E,N] (N in the order given). Checkpoints (safetensors) are written to
    `checkpoint_dir` every `checkpoint_every` epochs; with `state_dir`, the full training
    state (weights, optimizer, RNGs, dynamics so far) too, and `resume` continues from it.
    Under torchrun: data-parallel; dynamics only on rank 0, which alone writes files.
    """
    import torch
    import torch.nn.functional as F

    from pipeline import distributed as D
    from pipeline.training import resume as R
    from pipeline.device import resolve_device
    from pipeline.training.infer import normalize
    from pipeline.models import create_model, save_weights

    n = len(labels)
    if n < 2:
        raise CleanError(f"need at least 2 training images, got {n}")
    device = D.setup(resolve_device(recipe.device))
    world, rank = D.world_size(), D.rank()
    main = rank == 0
    if not main:
        progress = None
    cuda = device.startswith("cuda")
    amp = amp_dtype(recipe.amp, device)
    torch.manual_seed(recipe.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    _, c, h, w = images.shape
    core = create_model(recipe.model, num_classes, c, (h, w), recipe.pretrained, recipe.weights).to(device)
    nhwc = _channels_last(device)
    if nhwc:
        core = core.to(memory_format=torch.channels_last)
    mean, std = channel_stats(images)
    feed = _Feed(images, device)
    y_all = torch.as_tensor(np.array(labels, np.int64), device=device)
    model = core
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        if cuda:  # BatchNorm statistics over the global batch, as in one process
            core = model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(core)
        model = DistributedDataParallel(core, device_ids=[torch.device(device).index] if cuda else None)
    opt = _optimizer(recipe, model.parameters())
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    gen = torch.Generator().manual_seed(recipe.seed)
    E = recipe.epochs
    # a seeded random subset whose eval-mode last-layer gradient norm is recorded every epoch
    k = min(recipe.track, n)
    track_pos = np.sort(np.random.default_rng(recipe.seed).choice(n, size=k, replace=False)) if k else np.zeros(0, int)
    dyn = None
    if main:
        dyn = {key: np.zeros((E, n), np.float32) for key in ("loss", "margin", "p_label")}
        dyn["correct"] = np.zeros((E, n), bool)
        dyn["track_pos"] = track_pos
        dyn["track_grad_norm"] = np.zeros((E, k), np.float32)
    history, ckpts, start = [], [], 0
    if resume and state_dir is not None:
        got = R.load(state_dir) if main else None
        shared = D.broadcast(None if got is None else ({a: b for a, b in got[0].items() if not a.startswith("dyn/")},
                                                       got[1]))
        if shared is not None:
            tensors, meta = got if main else shared
            if meta["epoch"] > E:
                raise CleanError(f"{state_dir}: the saved state is at epoch {meta['epoch']} but train.epochs = {E}; "
                                 "run without --resume to start over")
            R.restore(tensors, meta, core, opt, scaler, gen, dyn, rank)
            history, ckpts, start = list(meta["history"]), list(meta["checkpoints"]), int(meta["epoch"])
            if progress:
                progress("log", message=f"resuming after epoch {start}/{E} (state in {state_dir})")
    track_x = feed.take(track_pos) if (main and k) else None
    bounds = _batch_bounds(n, recipe.batch_size)
    dev_type = "cuda" if cuda else "cpu"
    t0 = time.perf_counter()
    if progress:
        progress("start", desc="train", total=(E - start) * n)
    for epoch in range(start, E):
        lr = lr_at(recipe, epoch)
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        perm = torch.randperm(n, generator=gen).numpy()
        plan = [_local_slice(perm[s:e], world, rank) for s, e in bounds]
        recs, finite, win = [], None, 0
        for bi, ((s, e), (idx, weight), xb) in enumerate(zip(bounds, plan, feed.batches([p[0] for p in plan]))):
            idx_d = torch.as_tensor(idx, device=device)
            yb = y_all[idx_d]
            x = normalize(xb, mean, std, device)
            if nhwc:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev_type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                logits = model(x)
            loss_i = F.cross_entropy(logits.float(), yb, reduction="none")
            # one process: the batch mean; DDP averages over ranks, so Σ_local / (b / world)
            loss = loss_i.mean() if world == 1 else loss_i.sum() * (weight * world / (e - s))
            if not cuda:
                if not torch.isfinite(loss):
                    raise _diverged(loss.item(), epoch, s, e, recipe)
            else:  # checking costs a GPU sync: every 32 batches
                ok = torch.isfinite(loss.detach())
                finite = ok if finite is None else finite & ok
                if bi % 32 == 31 or bi == len(bounds) - 1:
                    if not bool(finite):
                        raise _diverged("nan or inf", epoch, win, e, recipe)
                    finite, win = None, e
            opt.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            if weight:
                with torch.no_grad():
                    lf = logits.detach().float()
                    z_y = lf.gather(1, yb[:, None])[:, 0]
                    other = lf.scatter(1, yb[:, None], float("-inf")).amax(1)
                    p_y = torch.softmax(lf, 1).gather(1, yb[:, None])[:, 0]
                    recs.append((idx, loss_i.detach(), z_y - other, p_y, lf.argmax(1) == yb))
            if progress:
                progress("advance", n=e - s)
        part = _records(recs)
        parts = D.gather(part) if world > 1 else [part]
        row = None
        if main:
            for p in parts:
                for key in ("loss", "margin", "p_label", "correct"):
                    dyn[key][epoch, p["idx"]] = p[key]
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": float(dyn["loss"][epoch].mean(dtype=np.float64)),
                   "train_accuracy": float(dyn["correct"][epoch].mean())}
        if val is not None and len(val[1]):
            vl = _predict(core, val[0], mean, std, device, nhwc)
            if main:
                vy = torch.as_tensor(np.array(val[1], np.int64))
                row["val_loss"] = float(F.cross_entropy(vl, vy).item())
                row["val_accuracy"] = float((vl.argmax(1) == vy).float().mean().item())
        if main and k:
            from pipeline.scores.gradnorm import forward_logits_features, last_layer_norms

            core.eval()
            with torch.no_grad():
                xt = normalize(track_x, mean, std, device)
                lg, hf = forward_logits_features(core, xt.contiguous(memory_format=torch.channels_last) if nhwc else xt)
                dyn["track_grad_norm"][epoch] = last_layer_norms(
                    lg.float(), hf.float(), y_all[torch.as_tensor(track_pos, device=device)], "l2").cpu().numpy()
        row = D.broadcast(row)
        history.append(row)
        if (epoch + 1) % recipe.checkpoint_every == 0 or epoch + 1 == E:
            if checkpoint_dir is not None:
                name = f"epoch_{epoch + 1:03d}.safetensors"
                if main:
                    save_weights(core, Path(checkpoint_dir) / name, {"epoch": epoch + 1, "lr": lr})
                ckpts.append({"epoch": epoch + 1, "lr": lr, "file": name})
            if state_dir is not None:  # after the checkpoint: a state never names a missing checkpoint
                rngs = D.gather(R.rng_states()) if world > 1 else None
                if main:
                    R.save(state_dir, *R.capture(core, opt, scaler, gen, dyn, epoch + 1, history, ckpts, rngs))
        if progress:
            msg = f"epoch {epoch + 1}/{E}  lr {lr:.3g}  loss {row['train_loss']:.4f}  acc {row['train_accuracy']:.4f}"
            if "val_accuracy" in row:
                msg += f"  val_loss {row['val_loss']:.4f}  val_acc {row['val_accuracy']:.4f}"
            progress("log", message=msg)
    if progress:
        progress("end")
    core.eval()
    return FitResult(core.cpu(), mean, std, dyn or {}, history, ckpts, time.perf_counter() - t0)


def _records(recs: list) -> dict:
    """One epoch's per-sample records of this rank → numpy {idx, loss, margin, p_label, correct}."""
    import torch

    if not recs:
        return {"idx": np.zeros(0, np.int64), "loss": np.zeros(0, np.float32), "margin": np.zeros(0, np.float32),
                "p_label": np.zeros(0, np.float32), "correct": np.zeros(0, bool)}
    cols = list(zip(*recs))
    out = {"idx": np.concatenate(cols[0]).astype(np.int64)}
    for key, col in zip(("loss", "margin", "p_label", "correct"), cols[1:]):
        out[key] = torch.cat(col).cpu().numpy()
    return out


def train(manifest: str | Path, out_dir: str | Path, recipe: Recipe, seeds: list[int] | None = None,
          progress=None, resume: bool = False) -> dict:
    """Stage: train on the manifest's `train` split, once per seed (default: [recipe.seed]).

    The first seed's run is the full model folder: out_dir/{model.safetensors, config.json,
    metrics.json, dynamics.npz, checkpoints/}; other seeds go to out_dir/seeds/seed_<s>/
    (model.safetensors, config.json, metrics.json). Returns the first run's metrics dict
    with `runs` (one entry per seed).

    Work happens in out_dir/.partial/ and replaces the old outputs only when every seed is
    done. An interrupted run leaves .partial/ behind (finished seed runs + the newest
    training state of the unfinished one); `resume=True` continues it (same settings
    required), a run without `resume` starts over. Under torchrun only rank 0 writes.
    """
    import shutil
    from dataclasses import replace

    from pipeline import distributed as D
    from pipeline.data.dataset import classes_path_for, read_classes, read_manifest
    from pipeline.device import resolve_device
    from pipeline.io import write_json
    from pipeline.data.stream import decoded_bytes, is_streamed, open_split

    manifest, out_dir = Path(manifest), Path(out_dir)
    if not manifest.exists():
        raise CleanError(f"manifest not found: {manifest}; create it with `clean prepare`")
    seeds = list(seeds) if seeds else [recipe.seed]
    D.setup(resolve_device(recipe.device))
    main = D.is_main()
    if not main:
        progress = None
    info = read_classes(classes_path_for(manifest))
    classes = info["classes"]
    df = read_manifest(manifest, classes)
    opts = dict(df=df, cache_max_gb=recipe.cache_max_gb, workers=recipe.workers)
    tr = open_split(manifest, "train", recipe.image_size, **opts)
    val = open_split(manifest, "val", recipe.image_size, **opts) if (df["split"] == "val").any() else None
    if progress and is_streamed(tr.images):
        gib = decoded_bytes(len(tr), tr.images.shape[1:]) / 2**30
        progress("log", message=f"streaming {len(tr):,} training images from disk ({gib:.1f} GiB decoded > "
                                f"data.cache_max_gb {recipe.cache_max_gb:g}) with {recipe.workers} decode worker(s)")
    partial = out_dir / PARTIAL
    decision = None
    if main:
        try:
            decision = _open_partial(partial, _fingerprint(recipe, seeds, manifest), seeds, resume)
        except CleanError as e:
            decision = {"error": str(e)}
    decision = D.broadcast(decision)
    if "error" in decision:
        raise CleanError(decision["error"])
    if progress and decision["note"]:
        progress("log", message=decision["note"])
    try:
        runs, first = [], {}
        for i, seed in enumerate(seeds):
            run_dir = _run_dir(partial, i, seed)
            if seed in decision["done"]:
                m = json.loads((run_dir / "metrics.json").read_text()) if main else {}
                if progress:
                    progress("log", message=f"seed {seed} ({i + 1}/{len(seeds)}): already trained")
            else:
                if progress and len(seeds) > 1:
                    progress("log", message=f"seed {seed} ({i + 1}/{len(seeds)})")
                m = _train_one(tr, val, classes, replace(recipe, seed=seed), manifest, run_dir, full=(i == 0),
                               progress=progress, resume=resume)
            first = first or m
            runs.append({"seed": seed, **{k: m[k] for k in ("train_accuracy", "val_accuracy", "seconds") if k in m}})
        if not main:
            D.barrier()  # until rank 0 has put the outputs in place (a next command may read them)
            return first
        first = json.loads((partial / "primary" / "metrics.json").read_text())
        first["runs"] = runs
        write_json(partial / "primary" / "metrics.json", first)
        for leftover in partial.rglob("resume"):
            shutil.rmtree(leftover, ignore_errors=True)
        for name in ("checkpoints", "seeds"):
            if (out_dir / name).exists():
                shutil.rmtree(out_dir / name)
        if (partial / "seeds").exists():
            (partial / "seeds").rename(out_dir / "seeds")
        (partial / "primary" / "checkpoints").rename(out_dir / "checkpoints")
        for f in ("dynamics.npz", "model.safetensors", "config.json", "metrics.json"):
            (partial / "primary" / f).replace(out_dir / f)
        shutil.rmtree(partial, ignore_errors=True)
        D.barrier()
    except BaseException:
        if main and not _resumable(partial):
            shutil.rmtree(partial, ignore_errors=True)
        raise
    return first


def _run_dir(partial: Path, i: int, seed: int) -> Path:
    return partial / "primary" if i == 0 else partial / "seeds" / f"seed_{seed}"


def _fingerprint(recipe: Recipe, seeds: list[int], manifest: Path) -> dict:
    """What a resumed run must share with the interrupted one (JSON-normalised)."""
    import hashlib

    r = {k: v for k, v in asdict(recipe).items() if k not in RESULT_NEUTRAL and k != "seed"}
    fp = {"recipe": r, "seeds": list(seeds), "manifest": str(manifest.resolve()),
          "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()}
    return json.loads(json.dumps(fp))


def _open_partial(partial: Path, fp: dict, seeds: list[int], resume: bool) -> dict:
    """Rank 0: reuse out_dir/.partial when resuming a run with the same settings, else start it
    afresh → {done: seeds already trained, note: a line for the user or None}."""
    import shutil

    from pipeline.io import write_json

    run_json = partial / "run.json"
    if resume and run_json.exists():
        try:
            old = json.loads(run_json.read_text())
        except json.JSONDecodeError:
            old = {}
        if old != fp:
            diff = [f"{k}" for k in ("seeds", "manifest", "manifest_sha256") if old.get(k) != fp[k]]
            o, r = old.get("recipe", {}), fp["recipe"]
            diff += [f"{k}: {o.get(k)!r} → {r.get(k)!r}" for k in r if o.get(k) != r.get(k)]
            raise CleanError(f"{partial}: the interrupted run there was made with other settings "
                             f"({'; '.join(diff) or 'unreadable run.json'}); run without --resume to start over")
        done = [s for i, s in enumerate(seeds) if (_run_dir(partial, i, s) / "metrics.json").exists()]
        return {"done": done, "note": f"resuming the interrupted run in {partial}"}
    note = f"nothing to resume in {partial}; training from scratch" if resume else None
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    write_json(run_json, fp)
    return {"done": [], "note": note}


def _resumable(partial: Path) -> bool:
    from pipeline.training.resume import STATE_JSON

    return partial.exists() and (any(partial.rglob(STATE_JSON)) or any(partial.rglob("metrics.json")))


def _train_one(tr, val, classes, recipe: Recipe, manifest: Path, run_dir: Path, full: bool, progress=None,
               resume: bool = False) -> dict:
    """One seed's run into run_dir (dynamics + checkpoints only when `full`). Returns metrics.

    The run's training state goes to run_dir/resume/ at every checkpoint epoch (removed
    once the run's files are written)."""
    import shutil

    import torch
    import timm

    from pipeline import distributed as D
    from pipeline.io import atomic_path, write_json
    from pipeline.models import save_weights

    main = D.is_main()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    ck = run_dir / "checkpoints" if full else None
    res = fit(tr.images, tr.labels, len(classes), recipe,
              val=(val.images, val.labels) if val is not None else None, checkpoint_dir=ck, progress=progress,
              state_dir=run_dir / "resume", resume=resume)
    final = res.history[-1]
    n = len(tr)
    metrics = {"n_train": n, "epochs": recipe.epochs, "seed": recipe.seed, "seconds": round(res.seconds, 3),
               "samples_per_s": round(recipe.epochs * n / max(res.seconds, 1e-9), 1),
               "train_loss": final["train_loss"], "train_accuracy": final["train_accuracy"]}
    for k in ("val_loss", "val_accuracy"):
        if k in final:
            metrics[k] = final[k]
    if not main:
        return metrics
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
    shutil.rmtree(run_dir / "resume", ignore_errors=True)
    return metrics
