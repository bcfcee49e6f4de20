"""The `score` stage: one row per training sample with every per-sample importance score.

Columns (METHODS.md §1): loss, grad_norm (‖∇_θ' L_i‖ for the chosen norm and parameter
subset), el2n ‖p − e_y‖₂, margin z_y − max_{k≠y} z_k, the training-dynamics scores aum,
forgetting, confidence, variability, and self_influence Σ_c lr_c ‖∇_θ' L_i(θ_c)‖₂² (TracIn)
over the saved epoch checkpoints. Model in eval mode; batched tensor math throughout.
"""
from __future__ import annotations

import contextlib
import time
import zipfile
from pathlib import Path

import numpy as np

from pipeline.errors import CleanError

SCORE_COLUMNS = ["loss", "grad_norm", "el2n", "margin", "aum", "forgetting", "confidence",
                 "variability", "self_influence"]
COLUMNS = ["id", "path", "label", "pred"] + SCORE_COLUMNS


def forward_scores(model, images_u8, labels: np.ndarray, mean, std, norm: str = "l2",
                   params: str = "last", batch_size: int = 256, device: str = "cpu",
                   progress=None) -> dict[str, np.ndarray]:
    """Eval-mode per-sample scores of uint8 images [N,C,H,W] with int labels [N].

    `images_u8` is an array or streamed images (pipeline/stream.py: decoded batch by batch
    by worker processes; never the whole set). Returns {pred [N] int, loss [N] nats,
    grad_norm [N], el2n [N], margin [N]} as numpy. Independent of batch_size (BatchNorm uses
    running stats). Always float32 (no autocast): the per-sample norm math needs it.
    """
    from pipeline.training.infer import batches
    from pipeline.data.stream import iter_batches

    model.eval()
    out = {k: np.empty(len(labels), np.float64) for k in ("loss", "grad_norm", "el2n", "margin")}
    out["pred"] = np.empty(len(labels), np.int64)
    spans = list(batches(len(labels), batch_size))
    feed = iter_batches(images_u8, [slice(s, e) for s, e in spans], pin=str(device).startswith("cuda"))
    with _exact_fp32():
        _score_batches(model, spans, feed, labels, mean, std, norm, params, device, out, progress)
    return out


@contextlib.contextmanager
def _exact_fp32():
    """No TF32 inside: on GPUs convolutions/matmuls otherwise round inputs to 10-bit mantissas."""
    import torch

    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _score_batches(model, spans, feed, labels, mean, std, norm, params, device, out, progress) -> None:
    import torch

    from pipeline.scores.gradnorm import per_sample_grad_norms
    from pipeline.training.infer import normalize

    for (s, e), xb in zip(spans, feed):
        x = normalize(xb, mean, std, device)
        y = torch.as_tensor(np.array(labels[s:e], np.int64), device=device)
        r = per_sample_grad_norms(model, x, y, norm=norm, params=params)
        logits = r["logits"].detach().double()  # float64 from here: small losses keep their digits
        p = torch.softmax(logits, 1)
        onehot = torch.nn.functional.one_hot(y, logits.shape[1]).double()
        z_y = logits.gather(1, y[:, None])[:, 0]
        other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
        out["loss"][s:e] = torch.nn.functional.cross_entropy(logits, y, reduction="none").cpu().numpy()
        out["grad_norm"][s:e] = r["grad_norm"].detach().double().cpu().numpy()
        out["el2n"][s:e] = torch.linalg.vector_norm(p - onehot, dim=1).double().cpu().numpy()
        out["margin"][s:e] = (z_y - other).double().cpu().numpy()
        out["pred"][s:e] = logits.argmax(1).cpu().numpy()
        if progress:
            progress("advance", n=e - s)


def self_influence(model, checkpoints: list[tuple[Path, float]], images_u8, labels, mean, std,
                   params: str = "last", batch_size: int = 256, device: str = "cpu",
                   progress=None) -> np.ndarray:
    """TracIn self-influence Σ_c lr_c · ‖∇_θ' L_i(θ_c)‖₂² over checkpoints [(file, lr_c)] → [N].

    `model` is loaded with each checkpoint's weights in turn (its own weights are restored).
    """
    import copy

    from pipeline.models import load_weights

    total = np.zeros(len(labels), np.float64)
    work = copy.deepcopy(model)
    for path, lr in checkpoints:
        load_weights(work, path)
        work.to(device).eval()
        g = forward_scores(work, images_u8, labels, mean, std, "l2", params, batch_size, device, progress)
        total += lr * g["grad_norm"] ** 2
    return total


def score(model_dir: str | Path, manifest: str | Path, out_dir: str | Path = "scores", norm: str = "l2",
          params: str = "last", batch_size: int = 256, device: str = "auto", split: str = "train",
          with_self_influence: bool = True, progress=None, cache_max_gb: float = 4.0, workers: int = 4):
    """Stage: score every sample of `split` → out_dir/scores.csv + out_dir/meta.json.

    Returns the scores DataFrame (one row per sample, columns COLUMNS [+ orig_label, noisy]).
    Images whose decoded size exceeds `cache_max_gb` GiB are streamed from disk, decoded by
    `workers` processes (same scores). Under torchrun each rank scores a contiguous block of
    samples (cut at batch boundaries, so every sample sits in the same batch as in one
    process); rank 0 gathers the blocks and writes the files; the other ranks return None.
    """
    import pandas as pd

    from pipeline import distributed as D
    from pipeline.data.dataset import classes_path_for, read_classes, read_manifest
    from pipeline.device import resolve_device
    from pipeline.scores.dynamics import dynamics_scores
    from pipeline.scores.gradnorm import NORMS, SUBSETS
    from pipeline.io import write_frame, write_json
    from pipeline.models import load_trained
    from pipeline.data.stream import is_streamed, open_split

    if norm not in NORMS:
        raise CleanError(f"score.norm = {norm!r} is not allowed; use one of: {', '.join(NORMS)}")
    if params not in SUBSETS:
        raise CleanError(f"score.params = {params!r} is not allowed; use one of: {', '.join(SUBSETS)}")
    t0 = time.perf_counter()
    model_dir, manifest, out_dir = Path(model_dir), Path(manifest), Path(out_dir)
    device = D.setup(resolve_device(device))
    main = D.is_main()
    if not main:
        progress = None
    model, cfg = load_trained(model_dir, device)
    if not manifest.exists():
        raise CleanError(f"manifest not found: {manifest}; create it with `clean prepare`")
    classes = read_classes(classes_path_for(manifest))["classes"]
    if list(classes) != list(cfg["classes"]):
        raise CleanError(f"{model_dir} was trained on classes {cfg['classes'][:5]}... but {manifest} has "
                         f"{classes[:5]}...; score with a model trained on this data (clean train)")
    df = read_manifest(manifest, classes)
    rows = df[df["split"] == split] if split != "all" else df
    if len(rows) == 0:
        raise CleanError(f"{manifest}: no '{split}' rows to score")
    ids, all_labels = rows["id"].to_numpy(np.int64), rows["label"].to_numpy(np.int64)
    lo, hi = D.shard(len(rows), batch_size)  # this rank's block; one process: everything
    # each rank decodes only its block (size and channels are fixed by the model's config)
    mine = rows.iloc[lo:hi] if (D.enabled() or split == "all") else None
    if hi > lo:
        data = open_split(manifest, split, cfg["image_size"], cfg["in_chans"], df=df, cache_max_gb=cache_max_gb,
                          workers=workers, rows=mine)
        images, labels = data.images, data.labels
    else:  # more processes than batches: nothing to do here
        images, labels = np.zeros((0, cfg["in_chans"], *cfg["image_size"]), np.uint8), all_labels[:0]
    streamed = is_streamed(images)
    mean, std = cfg["mean"], cfg["std"]
    ckpts = [(model_dir / "checkpoints" / c["file"], float(c["lr"])) for c in cfg.get("checkpoints", [])]
    ckpts = [(p, lr) for p, lr in ckpts if p.exists()]
    passes = 1 + (len(ckpts) if with_self_influence else 0)
    if progress:
        where = f", rank 0 of {D.world_size()}" if D.enabled() else ""
        progress("start", desc=f"score ({norm}, {params}{where})", total=passes * (hi - lo))
    s = forward_scores(model, images, labels, mean, std, norm, params, batch_size, device, progress)
    if with_self_influence:
        if not ckpts:
            raise CleanError(f"{model_dir}/checkpoints has no epoch checkpoints for self-influence; retrain "
                             "with `clean train` (train.checkpoint_every) or set score.self_influence: false")
        s["self_influence"] = self_influence(model, ckpts, images, labels, mean, std, params,
                                             batch_size, device, progress)
    else:
        s["self_influence"] = np.full(hi - lo, np.nan)
    if progress:
        progress("end")
    parts = D.gather(s)
    if not main:
        D.barrier()  # until rank 0 has written the files
        return None
    s = {k: np.concatenate([p[k] for p in parts]) for k in s}

    # training dynamics, matched by id (samples the model never trained on get NaN)
    dyn_path = model_dir / "dynamics.npz"
    dyn_cols = {k: np.full(len(ids), np.nan) for k in ("aum", "forgetting", "confidence", "variability")}
    n_dyn = 0
    if dyn_path.exists():
        try:
            with np.load(dyn_path, allow_pickle=False) as z:
                dyn = {k: z[k] for k in z.files}
            ds = dynamics_scores(dyn)
            dyn["ids"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise CleanError(f"{dyn_path}: not a readable training record ({type(e).__name__}: {e}); "
                             f"re-run `clean train --out {model_dir}`") from None
        pos = pd.Series(np.arange(len(dyn["ids"])), index=dyn["ids"])
        where = pos.reindex(ids).to_numpy()
        have = ~np.isnan(where)
        n_dyn = int(have.sum())
        for k in dyn_cols:
            dyn_cols[k][have] = ds[k][where[have].astype(np.int64)]

    rows = rows.set_index("id").loc[ids]
    out = pd.DataFrame({"id": ids, "path": rows["path"].to_numpy(), "label": all_labels,
                        "pred": s["pred"], "loss": s["loss"], "grad_norm": s["grad_norm"], "el2n": s["el2n"],
                        "margin": s["margin"], **dyn_cols, "self_influence": s["self_influence"]})
    for extra in ("orig_label", "noisy"):
        if extra in rows.columns:
            out[extra] = rows[extra].to_numpy()
    seconds = time.perf_counter() - t0
    write_frame(out_dir / "scores.csv", out)
    write_json(out_dir / "meta.json", {
        "norm": norm, "params": params, "model_dir": str(model_dir), "model": cfg["model"],
        "manifest": str(manifest), "split": split, "n": int(len(out)), "n_with_dynamics": n_dyn,
        "dynamics_epochs": len(cfg.get("history", [])),
        "dynamics_source": "each sample's minibatch forward pass during training, before the update",
        "self_influence": {"computed": bool(with_self_influence), "norm": "l2 squared", "params": params,
                           "checkpoints": [{"file": p.name, "lr": lr} for p, lr in ckpts] if with_self_influence else []},
        "seconds": round(seconds, 3), "columns": list(out.columns),
        "processes": D.world_size(), "streamed": bool(streamed),
    })
    D.barrier()
    return out
