"""The training loop `fit` and its helpers: one loop for round 1, retraining, seeds and cross-fitting.

`fit` trains on uint8 images (in memory, or streamed from disk: pipeline/data/stream.py) and
records per-epoch, per-sample training dynamics (loss, margin, correct, p(label)) from each
sample's minibatch forward pass, before the update (as in AUM / forgetting; docs/methods.md
§1.5, §5.1). It runs as named steps: `_setup` (model, DDP, optimizer, RNGs), `_restore`
(--resume state), then per epoch `_train_epoch` (the batches), `_gather_dynamics`,
`_validate`, `_track_norms` (tracked gradient norms) and `_checkpoint`. The recipe (what
defines a run) is pipeline/training/recipe.py; the `train` stage (manifest in, model folder
out) is pipeline/stages/train.py.

Under `torchrun` (pipeline/distributed.py) the same loop is data-parallel (DDP): every rank
draws the same permutation, takes its contiguous slice of each global batch, and the loss is
scaled so that DDP's gradient average equals the one-process gradient of the global batch
mean; dynamics rows are gathered on rank 0. On CUDA: mixed precision (`train.amp`),
channels_last, pinned memory and non-blocking copies. State for `--resume`:
pipeline/training/resume.py.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import distributed as D
from pipeline.device import resolve_device
from pipeline.distributed import even_split
from pipeline.errors import CleanError
from pipeline.models import create_model, save_weights
from pipeline.training import resume as R
from pipeline.training.augment import batch_params, resolve
from pipeline.training.infer import normalize
from pipeline.training.recipe import Recipe, amp_dtype, lr_at, make_optimizer


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

    a, b = even_split(len(batch), world, rank)
    return (batch[a:b], 1.0) if b > a else (batch[:1], 0.0)


def channel_histogram(images, chunk: int = 1024) -> np.ndarray:
    """Per-channel counts of every uint8 value, int64 [C, 256] (exact, independent of order).

    Streamed images are read in batches by the decode workers (and sharded across ranks
    under torchrun, the counts summed).
    """
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


def _to_input(xb, mean, std, device: str, channels_last: bool):
    """uint8 images → normalised float inputs on `device` (NHWC when `channels_last`)."""
    import torch

    x = normalize(xb, mean, std, device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _predict(core, images, mean, std, device: str, channels_last: bool, batch_size: int = 512):
    """Eval-mode logits of every image, this rank's shard computed here, all of them on rank 0
    (None elsewhere). One process: identical to `infer.predict_logits`."""
    import torch

    from pipeline.data.stream import iter_batches

    core.eval()
    s, e = D.shard(len(images), batch_size)
    out = []
    with torch.inference_mode():
        for xb in iter_batches(images, [slice(a, min(e, a + batch_size)) for a in range(s, e, batch_size)],
                               pin=str(device).startswith("cuda")):
            out.append(core(_to_input(xb, mean, std, device, channels_last)).float().cpu())
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


@dataclass
class _Run:
    """The live state of one `fit`, shared by its steps."""

    recipe: Recipe
    device: str
    world: int
    rank: int
    amp: object            # autocast dtype, or None for float32
    core: object           # the model itself (saved, evaluated)
    model: object          # core, or its DDP wrapper under torchrun (trained)
    nhwc: bool             # channels_last inputs
    mean: list
    std: list
    feed: _Feed
    y_all: object          # every label, int64 on device
    opt: object
    scaler: object         # GradScaler for fp16, else None
    gen: object            # the generator of the per-epoch permutations
    track_pos: np.ndarray  # positions whose gradient norm is recorded every epoch
    dyn: dict | None       # per-epoch dynamics (rank 0 only)
    history: list = field(default_factory=list)
    ckpts: list = field(default_factory=list)
    start: int = 0         # first epoch to train (after a restored state)
    augment: bool = False  # crop + flip training batches (train.augment; pipeline/training/augment.py)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def n(self) -> int:
        return len(self.y_all)


def fit(images, labels: np.ndarray, num_classes: int, recipe: Recipe,
        val: tuple | None = None, checkpoint_dir: Path | None = None,
        progress=None, state_dir: Path | None = None, resume: bool = False) -> FitResult:
    """Train `recipe.model` from scratch on uint8 images [N,C,H,W] with int labels [N].

    `images` is an array or streamed images (pipeline/data/stream.py; same results). Returns the
    model (eval mode, on CPU), normalisation stats, and dynamics: loss/margin/p_label float32
    [E,N], correct bool [E,N] (N in the order given). Checkpoints (safetensors) are written to
    `checkpoint_dir` every `checkpoint_every` epochs; with `state_dir`, the full training
    state (weights, optimizer, RNGs, dynamics so far) too, and `resume` continues from it.
    Under torchrun: data-parallel; dynamics only on rank 0, which alone writes files.
    """

    n = len(labels)
    if n < 2:
        raise CleanError(f"need at least 2 training images, got {n}")
    run = _setup(images, labels, num_classes, recipe)
    if not run.main:
        progress = None
    if resume and state_dir is not None:
        _restore(run, state_dir, progress)
    track_x = run.feed.take(run.track_pos) if (run.main and len(run.track_pos)) else None
    bounds = _batch_bounds(n, recipe.batch_size)
    E = recipe.epochs
    t0 = time.perf_counter()
    if progress:
        progress("start", desc="train", total=(E - run.start) * n)
    for epoch in range(run.start, E):
        lr = lr_at(recipe, epoch)
        row = _gather_dynamics(run, epoch, lr, _train_epoch(run, epoch, lr, bounds, progress))
        if val is not None and len(val[1]):
            _validate(run, val, row)
        if track_x is not None:
            _track_norms(run, epoch, track_x)
        row = D.broadcast(row)
        run.history.append(row)
        if (epoch + 1) % recipe.checkpoint_every == 0 or epoch + 1 == E:
            _checkpoint(run, epoch, lr, checkpoint_dir, state_dir)
        if progress:
            progress("log", message=_epoch_line(epoch, E, lr, row))
    if progress:
        progress("end")
    run.core.eval()
    return FitResult(run.core.cpu(), run.mean, run.std, run.dyn or {}, run.history, run.ckpts,
                     time.perf_counter() - t0)


def _setup(images, labels: np.ndarray, num_classes: int, recipe: Recipe) -> _Run:
    """Device (and process group), seeded model, normalisation stats, DDP, optimizer, the
    permutation generator and the tracked samples, in this order (it fixes the RNG draws)."""
    import torch

    device = D.setup(resolve_device(recipe.device))
    world, rank = D.world_size(), D.rank()
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
    core, model = _parallel(core, device, world)
    opt = make_optimizer(recipe, model.parameters())
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    gen = torch.Generator().manual_seed(recipe.seed)
    n, E = len(labels), recipe.epochs
    # a seeded random subset whose eval-mode last-layer gradient norm is recorded every epoch
    k = min(recipe.track, n)
    track_pos = np.sort(np.random.default_rng(recipe.seed).choice(n, size=k, replace=False)) if k else np.zeros(0, int)
    dyn = None
    if rank == 0:
        dyn = {key: np.zeros((E, n), np.float32) for key in ("loss", "margin", "p_label")}
        dyn["correct"] = np.zeros((E, n), bool)
        dyn["track_pos"] = track_pos
        dyn["track_grad_norm"] = np.zeros((E, k), np.float32)
        dyn["probs_sum"] = np.zeros((n, num_classes), np.float32)  # Σ over the first epochs of the pre-update softmax

    return _Run(recipe, device, world, rank, amp, core, model, nhwc, mean, std, feed, y_all, opt, scaler, gen,
                track_pos, dyn, augment=resolve(recipe.augment, c, (h, w)))


def _parallel(core, device: str, world: int) -> tuple:
    """(core, model): under torchrun the model is core's DDP wrapper (with SyncBatchNorm on
    CUDA, so that BatchNorm statistics are over the global batch, as in one process)."""
    if world == 1:
        return core, core
    import torch
    from torch.nn.parallel import DistributedDataParallel

    cuda = device.startswith("cuda")
    if cuda:
        core = torch.nn.SyncBatchNorm.convert_sync_batchnorm(core)
    return core, DistributedDataParallel(core, device_ids=[torch.device(device).index] if cuda else None)


def _restore(run: _Run, state_dir: Path, progress) -> None:
    """Continue from the newest training state in `state_dir`, if any: rank 0 reads it, every
    rank restores weights, optimizer, RNGs (and rank 0 the dynamics so far)."""

    got = R.load(state_dir) if run.main else None
    shared = D.broadcast(None if got is None else ({a: b for a, b in got[0].items() if not a.startswith("dyn/")},
                                                   got[1]))
    if shared is None:
        return
    tensors, meta = got if run.main else shared
    E = run.recipe.epochs
    if meta["epoch"] > E:
        raise CleanError(f"{state_dir}: the saved state is at epoch {meta['epoch']} but train.epochs = {E}; "
                         "run without --resume to start over")
    R.restore(tensors, meta, run.core, run.opt, run.scaler, run.gen, run.dyn, run.rank)
    run.history, run.ckpts, run.start = list(meta["history"]), list(meta["checkpoints"]), int(meta["epoch"])
    if progress:
        progress("log", message=f"resuming after epoch {run.start}/{E} (state in {state_dir})")


def _train_epoch(run: _Run, epoch: int, lr: float, bounds: list, progress) -> list:
    """One epoch's batches at learning rate `lr` in a fresh permutation → this rank's per-sample
    records from each batch's forward pass, before its update. A non-finite loss raises (on
    CUDA checked every 32 batches: a check costs a GPU sync)."""
    import torch

    for g in run.opt.param_groups:
        g["lr"] = lr
    run.model.train()
    perm = torch.randperm(run.n, generator=run.gen).numpy()
    plan = [_local_slice(perm[s:e], run.world, run.rank) for s, e in bounds]
    recs, finite, win = [], None, 0
    for bi, ((s, e), (idx, weight), xb) in enumerate(zip(bounds, plan, run.feed.batches([p[0] for p in plan]))):
        yb = run.y_all[torch.as_tensor(idx, device=run.device)]
        aug = batch_params(run.gen, e - s, *xb.shape[2:], run.world, run.rank) if run.augment else None
        logits, loss_i, loss = _forward(run, xb, yb, weight, e - s, aug)
        if not run.cuda:
            if not torch.isfinite(loss):
                raise _diverged(loss.item(), epoch, s, e, run.recipe)
        else:
            ok = torch.isfinite(loss.detach())
            finite = ok if finite is None else finite & ok
            if bi % 32 == 31 or bi == len(bounds) - 1:
                if not bool(finite):
                    raise _diverged("nan or inf", epoch, win, e, run.recipe)
                finite, win = None, e
        _step(run, loss)
        if weight:
            recs.append(_record(idx, yb, logits, loss_i))
        if progress:
            progress("advance", n=e - s)
    return recs


def _forward(run: _Run, xb, yb, weight: float, size: int, aug=None) -> tuple:
    """A batch's train-mode forward pass (under autocast with `train.amp`; cropped and flipped
    by `aug`, pipeline/training/augment.py) → (logits, per-sample loss, the loss to back-propagate)."""
    import torch
    import torch.nn.functional as F

    from pipeline.training.augment import apply

    x = _to_input(xb, run.mean, run.std, run.device, run.nhwc)
    if aug is not None:
        x = apply(x, aug)
    with torch.autocast("cuda" if run.cuda else "cpu", dtype=run.amp or torch.bfloat16, enabled=run.amp is not None):
        logits = run.model(x)
    loss_i = F.cross_entropy(logits.float(), yb, reduction="none")
    # one process: the batch mean; DDP averages over ranks, so Σ_local / (b / world)
    loss = loss_i.mean() if run.world == 1 else loss_i.sum() * (weight * run.world / size)
    return logits, loss_i, loss


def _step(run: _Run, loss) -> None:
    """Backward pass and optimizer step (through the GradScaler for fp16)."""
    run.opt.zero_grad(set_to_none=True)
    if run.scaler is None:
        loss.backward()
        run.opt.step()
    else:
        run.scaler.scale(loss).backward()
        run.scaler.step(run.opt)
        run.scaler.update()


def _record(idx: np.ndarray, yb, logits, loss_i) -> tuple:
    """A batch's per-sample training record: (idx, loss, margin, p(label), correct, softmax [b, C])."""
    import torch

    with torch.no_grad():
        lf = logits.detach().float()
        z_y = lf.gather(1, yb[:, None])[:, 0]
        other = lf.scatter(1, yb[:, None], float("-inf")).amax(1)
        probs = torch.softmax(lf, 1)
        p_y = probs.gather(1, yb[:, None])[:, 0]
        return idx, loss_i.detach(), z_y - other, p_y, lf.argmax(1) == yb, probs


def _gather_dynamics(run: _Run, epoch: int, lr: float, recs: list) -> dict | None:
    """Every rank's records of the epoch into rank 0's dynamics → the epoch's history row
    (rank 0; None elsewhere)."""

    part = _records(recs)
    parts = D.gather(part) if run.world > 1 else [part]
    if not run.main:
        return None
    for p in parts:
        for key in ("loss", "margin", "p_label", "correct"):
            run.dyn[key][epoch, p["idx"]] = p[key]
        if epoch < run.recipe.probs_epochs:  # each sample sits once in an epoch's permutation
            run.dyn["probs_sum"][p["idx"]] += p["probs"]
    return {"epoch": epoch + 1, "lr": lr, "train_loss": float(run.dyn["loss"][epoch].mean(dtype=np.float64)),
            "train_accuracy": float(run.dyn["correct"][epoch].mean())}


def _validate(run: _Run, val: tuple, row: dict | None) -> None:
    """Eval-mode loss and accuracy on the validation images (every rank predicts its shard)
    → row's val_loss, val_accuracy on rank 0."""
    import torch
    import torch.nn.functional as F

    vl = _predict(run.core, val[0], run.mean, run.std, run.device, run.nhwc)
    if run.main:
        vy = torch.as_tensor(np.array(val[1], np.int64))
        row["val_loss"] = float(F.cross_entropy(vl, vy).item())
        row["val_accuracy"] = float((vl.argmax(1) == vy).float().mean().item())


def _track_norms(run: _Run, epoch: int, track_x) -> None:
    """Rank 0: the eval-mode last-layer gradient norm (l2) of each tracked sample after `epoch`."""
    import torch

    from pipeline.head import forward_logits_features, last_layer_norms

    run.core.eval()
    with torch.no_grad():
        lg, hf = forward_logits_features(run.core, _to_input(track_x, run.mean, run.std, run.device, run.nhwc))
        y = run.y_all[torch.as_tensor(run.track_pos, device=run.device)]
        run.dyn["track_grad_norm"][epoch] = last_layer_norms(lg.float(), hf.float(), y, "l2").cpu().numpy()


def _checkpoint(run: _Run, epoch: int, lr: float, checkpoint_dir: Path | None, state_dir: Path | None) -> None:
    """The epoch's checkpoint (safetensors) and then its full training state (for --resume)."""

    if checkpoint_dir is not None:
        name = f"epoch_{epoch + 1:03d}.safetensors"
        if run.main:
            save_weights(run.core, Path(checkpoint_dir) / name, {"epoch": epoch + 1, "lr": lr})
        run.ckpts.append({"epoch": epoch + 1, "lr": lr, "file": name})
    if state_dir is not None:  # after the checkpoint: a state never names a missing checkpoint
        rngs = D.gather(R.rng_states()) if run.world > 1 else None
        if run.main:
            R.save(state_dir, *R.capture(run.core, run.opt, run.scaler, run.gen, run.dyn, epoch + 1, run.history,
                                         run.ckpts, rngs))


def _epoch_line(epoch: int, epochs: int, lr: float, row: dict) -> str:
    msg = f"epoch {epoch + 1}/{epochs}  lr {lr:.3g}  loss {row['train_loss']:.4f}  acc {row['train_accuracy']:.4f}"
    if "val_accuracy" in row:
        msg += f"  val_loss {row['val_loss']:.4f}  val_acc {row['val_accuracy']:.4f}"
    return msg


def _records(recs: list) -> dict:
    """One epoch's per-sample records of this rank → numpy {idx, loss, margin, p_label, correct, probs}."""
    import torch

    if not recs:
        return {"idx": np.zeros(0, np.int64), "loss": np.zeros(0, np.float32), "margin": np.zeros(0, np.float32),
                "p_label": np.zeros(0, np.float32), "correct": np.zeros(0, bool), "probs": np.zeros((0, 0), np.float32)}
    cols = list(zip(*recs))
    out = {"idx": np.concatenate(cols[0]).astype(np.int64)}
    for key, col in zip(("loss", "margin", "p_label", "correct", "probs"), cols[1:]):
        out[key] = torch.cat(col).cpu().numpy()
    return out
