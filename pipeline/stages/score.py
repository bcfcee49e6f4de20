"""The `score` stage: one row per training sample with every per-sample importance score.

Columns (docs/methods.md §1): loss, grad_norm (‖∇_θ' L_i‖ for the chosen norm and parameter
subset), el2n ‖p − e_y‖₂, margin z_y − max_{k≠y} z_k, the training-dynamics scores aum,
forgetting, confidence, variability, self_influence Σ_c lr_c ‖∇_θ' L_i(θ_c)‖₂² (TracIn) and
val_influence Σ_c lr_c ⟨∇_θ' L_i(θ_c), ∇_θ' L̄_val(θ_c)⟩ (L̄_val: mean loss over the validation
split) over the saved epoch checkpoints. Model in eval mode; batched tensor math throughout.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline.data.stream import is_streamed, open_split
from pipeline.errors import CleanError
from pipeline.formats.dynamics import load_dynamics
from pipeline.formats.manifest import classes_path_for, read_classes, read_manifest
from pipeline.io import together, write_frame, write_json
from pipeline.params import CHOICES, DEFAULTS
from pipeline.registry import SCORES
from pipeline.scores.compute import forward_scores, self_influence
from pipeline.scores.dynamics import DYNAMICS_INPUTS, dynamics_scores
from pipeline.scores.features import FEATURE_KEYS
from pipeline.scores.influence import val_influence

def score_columns() -> list[str]:
    """The score columns of scores.csv, in order (the SCORES registry)."""
    return SCORES.names()


def columns() -> list[str]:
    """Every column of scores.csv: id, path, label, pred, then the score columns."""
    return ["id", "path", "label", "pred"] + score_columns()


_S, _D, _T = DEFAULTS["score"], DEFAULTS["data"], DEFAULTS["train"]


def score(model_dir: str | Path, manifest: str | Path, out_dir: str | Path, norm: str = _S["norm"],
          params: str = _S["params"], batch_size: int = _S["batch_size"], device: str = _T["device"],
          split: str = _S["split"], with_self_influence: bool = _S["self_influence"], progress=None,
          cache_max_gb: float = _D["cache_max_gb"], workers: int = _T["workers"],
          embeddings: bool = _S["embeddings"], with_val_influence: bool = _S["val_influence"],
          with_importance: bool = _S["importance"], importance_dim: int = _S["importance_dim"]):
    """Stage: score every sample of `split` → out_dir/scores.csv + out_dir/meta.json
    (+ out_dir/embeddings.npz with `embeddings`: every split's penultimate features, pixel
    hashes and image statistics for flag's duplicate / outlier / image checks).

    Returns the scores DataFrame (one row per sample, columns :func:`columns` [+ orig_label,
    noisy]). Defaults are params.yaml's (pipeline/params.py). Images whose decoded size
    exceeds `cache_max_gb` GiB are streamed from disk, decoded by `workers` processes (same
    scores). Under torchrun each rank scores a contiguous block of samples (cut at batch
    boundaries, so every sample sits in the same batch as in one process); rank 0 gathers
    the blocks and writes the files; the other ranks return None.
    """
    from pipeline import distributed as D
    from pipeline.device import resolve_device
    from pipeline.models import load_trained

    _check_settings(norm, params, split)
    t0 = time.perf_counter()
    model_dir, manifest, out_dir = Path(model_dir), Path(manifest), Path(out_dir)
    device = D.setup(resolve_device(device))
    if not D.is_main():
        progress = None
    model, cfg = load_trained(model_dir, device)
    df, rows = _rows(manifest, cfg, model_dir, split)
    lo, hi = D.shard(len(rows), batch_size)  # this rank's block; one process: everything
    images, labels = _open_block(manifest, df, rows, cfg, split, lo, hi, cache_max_gb, workers)
    ckpts = _checkpoints(model_dir, cfg) if with_self_influence else []
    if with_self_influence and not ckpts:
        raise CleanError(f"{model_dir}/checkpoints has no epoch checkpoints for self-influence; retrain "
                         "with `clean train` (train.checkpoint_every) or set score.self_influence: false")
    vckpts, val = _val_inputs(manifest, df, cfg, model_dir, cache_max_gb, workers) if with_val_influence else ([], None)
    ref = _reference(model, val, cfg, batch_size, device) if val is not None else None
    if progress:
        where = f", rank 0 of {D.world_size()}" if D.enabled() else ""
        progress("start", desc=f"score ({norm}, {params}{where})", total=(1 + len(ckpts) + len(vckpts)) * (hi - lo))
    s = forward_scores(model, images, labels, cfg["mean"], cfg["std"], norm, params, batch_size, device, progress,
                       features=embeddings)
    s["self_influence"] = (self_influence(model, ckpts, images, labels, cfg["mean"], cfg["std"], params,
                                          batch_size, device, progress) if ckpts else np.full(hi - lo, np.nan))
    s["val_influence"] = (val_influence(model, vckpts, images, labels, ref.images, ref.labels, cfg["mean"], cfg["std"],
                                        params, batch_size, device, progress) if val is not None
                          else np.full(hi - lo, np.nan))
    attribution = None
    if with_importance and split == "train" and not D.enabled() and (df["split"] == "val").any():
        s["importance"], attribution = _importance(model_dir, model, cfg, manifest, df, images, labels, importance_dim,
                                                   batch_size, device, cache_max_gb, workers, progress,
                                                   None if ref is None else ref.mask)
    else:
        s["importance"] = np.full(hi - lo, np.nan)
    if progress:
        progress("end")
    parts = D.gather(s)
    if not D.is_main():
        D.barrier()  # until rank 0 has written the files
        return None
    s = {k: np.concatenate([p[k] for p in parts if k in p]) for k in s}
    _check_finite(s, model_dir, split)
    scored = {k: s.pop(k) for k in FEATURE_KEYS if k in s}  # the scored rows' features, from the same pass
    with together(out_dir):  # scores.csv, meta.json (and embeddings.npz) change as one
        if embeddings:
            _write_features(out_dir / "embeddings.npz", model, manifest, df, df["id"].isin(rows["id"]).to_numpy(),
                            scored, cfg, batch_size, device, cache_max_gb, workers, progress)
        ids = rows["id"].to_numpy(np.int64)
        dyn_cols, n_dyn = _dynamics_columns(model_dir, ids)
        out = _frame(rows, s, dyn_cols)
        write_frame(out_dir / "scores.csv", out)
        _write_attribution(out_dir / "attribution.npz", ids, attribution)
        write_json(out_dir / "meta.json", {
            "norm": norm, "params": params, "model_dir": str(model_dir), "model": cfg["model"],
            "manifest": str(manifest), "split": split, "n": int(len(out)), "n_with_dynamics": n_dyn,
            "dynamics_epochs": len(cfg.get("history", [])),
            "dynamics_source": "each sample's minibatch forward pass during training, before the update",
            "self_influence": {"computed": bool(with_self_influence), "norm": "l2 squared", "params": params,
                               "checkpoints": [{"file": p.name, "lr": lr} for p, lr in ckpts]},
            "val_influence": {"computed": val is not None, "params": params, "n_val": 0 if val is None else len(val.labels),
                              "n_reference": 0 if ref is None else len(ref.labels),
                              "checkpoints": [{"file": p.name, "lr": lr} for p, lr in vckpts]},
            "importance": None if attribution is None else {
                "method": "TRAK, count-sketched all-parameter gradients, one model per seed", "dim": importance_dim,
                "models": attribution["models"], "n_reference_val": int(attribution["reference"].sum()),
                "calibration": attribution["calibration"], "file": "attribution.npz"},
            "seconds": round(time.perf_counter() - t0, 3), "columns": list(out.columns),
            "processes": D.world_size(), "streamed": bool(is_streamed(images)),
        })
    D.barrier()
    return out


def _write_features(path: Path, model, manifest: Path, df, scored_mask: np.ndarray, scored: dict, cfg: dict,
                    batch_size: int, device: str, cache_max_gb: float, workers: int, progress) -> None:
    """embeddings.npz for every row of the manifest: ids, split, emb [M, D] float16, hash, image stats.

    `scored` holds the features of the rows where `scored_mask` [M] is true (from the scoring
    pass, in manifest order); only the other rows are decoded and forwarded here."""
    from pipeline.io import atomic_path
    from pipeline.scores.features import empty_features, image_features, native_sizes

    if not scored:
        scored_mask = np.zeros(len(df), bool)
    rest = df[~scored_mask]
    extra = {}
    if len(rest):
        data = open_split(manifest, "all", cfg["image_size"], cfg["in_chans"], df=df, cache_max_gb=cache_max_gb,
                          workers=workers, rows=rest)
        if progress:
            progress("start", desc="embed the other splits", total=len(rest))
        extra = image_features(model, data.images, cfg["mean"], cfg["std"], batch_size, device, progress)
        if progress:
            progress("end")
    dim = (scored.get("emb") if scored_mask.any() else extra["emb"]).shape[1]
    feats = empty_features(len(df), dim)
    for k, v in feats.items():
        if scored_mask.any():
            v[scored_mask] = scored[k]
        if len(rest):
            v[~scored_mask] = extra[k]
    info = read_classes(classes_path_for(manifest))
    if info.get("uniform_size") is True and info.get("image_size"):  # prepare saw one stored size for all
        height, width = (np.full(len(df), int(v), np.int64) for v in info["image_size"])
    else:  # one header read per file
        height, width = native_sizes(df["path"].tolist(), manifest.parent)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, ids=df["id"].to_numpy(np.int64), split=df["split"].to_numpy().astype("U5"),
                     label=df["label"].to_numpy(np.int64), height=height, width=width, **feats)


def _seed_models(model_dir: Path, model, cfg: dict, device: str) -> tuple[list, list[str]]:
    """The base model and every other seed's model in model_dir/seeds/ (eval mode) → (models, folders)."""
    import copy

    from pipeline.models import load_weights

    models, names = [model], [str(model_dir)]
    for d in sorted((model_dir / "seeds").glob("seed_*")):
        if (d / "model.safetensors").exists():
            m = copy.deepcopy(model)
            load_weights(m, d / "model.safetensors")
            models.append(m.to(device).eval())
            names.append(str(d))
    return models, names


def _importance(model_dir: Path, model, cfg: dict, manifest: Path, df, images, labels, k: int, batch_size: int,
                device: str, cache_max_gb: float, workers: int, progress, reference=None):
    """(importance [N] = mean over the seeds' models of the predicted change of the mean validation
    loss when the image is removed, nats; the attribution dict for attribution.npz)."""
    from pipeline.scores.attribution import CALIBRATION, removal_effects

    models, names = _seed_models(model_dir, model, cfg, device)
    val = open_split(manifest, "val", cfg["image_size"], cfg["in_chans"], df=df, cache_max_gb=cache_max_gb,
                     workers=workers)
    if progress:
        progress("log", message=f"importance: TRAK over {len(models)} model(s), k = {k}")
    att = removal_effects(models, images, labels, val.images, val.labels, cfg["mean"], cfg["std"], k, batch_size,
                          device, reference=reference)
    att.update(val_ids=np.asarray(val.ids, np.int64), models=names, calibration=CALIBRATION)
    return att["effects"].mean(0), att


def _write_attribution(path: Path, ids: np.ndarray, att: dict) -> None:
    """attribution.npz: ids [N], effects [M, N] (nats, calibrated), val_ids [V], reference [V] bool,
    val_loss [M, V] (each seed model's loss of each validation row), calibration. Without an
    attribution (score.importance: false) M = V = 0, so the file a DVC stage declares exists."""
    from pipeline.io import atomic_path

    if att is None:
        att = {"effects": np.zeros((0, len(ids))), "val_ids": np.zeros(0, np.int64), "reference": np.zeros(0, bool),
               "val_loss": np.zeros((0, 0)), "calibration": np.nan}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, ids=ids, effects=att["effects"], val_ids=att["val_ids"], reference=att["reference"],
                     val_loss=att["val_loss"], calibration=np.float64(att["calibration"]))


def _check_finite(s: dict, model_dir: Path, split: str) -> None:
    """CleanError when the model's loss is NaN/inf on some images (broken weights or config
    numbers): scores.csv is never written with such rows."""
    bad = ~np.isfinite(np.asarray(s["loss"], np.float64))
    if bad.any():
        raise CleanError(f"{model_dir}: the model gives a NaN/inf loss on {int(bad.sum())} of {len(bad)} '{split}' "
                         "images, so no score would mean anything; its weights or config.json are broken: retrain "
                         f"it with `clean train --out {model_dir}`")


def _check_settings(norm: str, params: str, split: str) -> None:
    for key, value in (("score.norm", norm), ("score.params", params), ("score.split", split)):
        allowed = CHOICES[key]
        if value not in allowed:
            raise CleanError(f"{key} = {value!r} is not allowed; use one of: {', '.join(allowed)}")


def _rows(manifest: Path, cfg: dict, model_dir: Path, split: str):
    """(whole manifest, the rows of `split`) after checking the model fits the data."""
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
    return df, rows


def _open_block(manifest: Path, df, rows, cfg: dict, split: str, lo: int, hi: int, cache_max_gb: float,
                workers: int):
    """This rank's images [hi-lo, C, H, W] (in memory or streamed) and labels [hi-lo]."""
    from pipeline import distributed as D

    if hi <= lo:  # more processes than batches: nothing to do here
        return np.zeros((0, cfg["in_chans"], *cfg["image_size"]), np.uint8), np.zeros(0, np.int64)
    # each rank decodes only its block (size and channels are fixed by the model's config)
    mine = rows.iloc[lo:hi] if (D.enabled() or split == "all") else None
    data = open_split(manifest, split, cfg["image_size"], cfg["in_chans"], df=df, cache_max_gb=cache_max_gb,
                      workers=workers, rows=mine)
    return data.images, data.labels


def _val_inputs(manifest: Path, df, cfg: dict, model_dir: Path, cache_max_gb: float, workers: int):
    """(checkpoints, validation Split) for val_influence; CleanError without either."""
    if not (df["split"] == "val").any():
        raise CleanError(f"{manifest} has no 'val' rows, and val_influence measures each training image's effect on "
                         "the validation loss: re-run `clean prepare` with data.val_frac > 0, or set "
                         "score.val_influence: false")
    ckpts = _checkpoints(model_dir, cfg)
    if not ckpts:
        raise CleanError(f"{model_dir}/checkpoints has no epoch checkpoints for val_influence; retrain with "
                         "`clean train` (train.checkpoint_every) or set score.val_influence: false")
    return ckpts, open_split(manifest, "val", cfg["image_size"], cfg["in_chans"], df=df, cache_max_gb=cache_max_gb,
                             workers=workers)


def _reference(model, val, cfg: dict, batch_size: int, device: str):
    """The validation rows trusted as the target of val_influence: those that are not label issues
    per pipeline.rules.labels.heldout_label_issues on the model's (out-of-sample) softmax → a
    Split-like object with `images`, `labels`, `ids` and `mask` [V] bool."""
    from types import SimpleNamespace

    from pipeline.scores.attribution import reference_rows, val_probs

    mask = reference_rows(val.labels, val_probs(model, val.images, val.labels, cfg["mean"], cfg["std"], batch_size,
                                                device))
    pos = np.flatnonzero(mask)
    if is_streamed(val.images):
        from pipeline.data.stream import StreamImages

        v = val.images
        images = StreamImages(v.paths[pos], v.base_dir, v.chw, v.workers)
    else:
        images = val.images[pos]
    return SimpleNamespace(images=images, labels=np.asarray(val.labels)[pos], ids=np.asarray(val.ids)[pos], mask=mask)


def _checkpoints(model_dir: Path, cfg: dict) -> list[tuple[Path, float]]:
    """The saved epoch checkpoints [(file, lr)] that exist."""
    ckpts = [(model_dir / "checkpoints" / c["file"], float(c["lr"])) for c in cfg.get("checkpoints", [])]
    return [(p, lr) for p, lr in ckpts if p.exists()]


def _dynamics_columns(model_dir: Path, ids: np.ndarray) -> tuple[dict, int]:
    """Training-dynamics scores matched by id ({name: [N]}, NaN for samples never trained on)."""
    import pandas as pd

    cols = {k: np.full(len(ids), np.nan) for k in score_columns() if "dynamics" in SCORES[k].needs}
    path = model_dir / "dynamics.npz"
    if not path.exists():
        return cols, 0
    dyn = load_dynamics(path, need=("ids",) + DYNAMICS_INPUTS)
    ds = dynamics_scores(dyn)
    where = pd.Series(np.arange(len(dyn["ids"])), index=dyn["ids"]).reindex(ids).to_numpy()
    have = ~np.isnan(where)
    for k in cols:
        cols[k][have] = ds[k][where[have].astype(np.int64)]
    return cols, int(have.sum())


def _frame(rows, s: dict, dyn_cols: dict):
    """scores.csv as a DataFrame: id, path, label, pred, every score column (+ noise truth)."""
    import pandas as pd

    values = {**s, **dyn_cols}
    out = pd.DataFrame({"id": rows["id"].to_numpy(np.int64), "path": rows["path"].to_numpy(),
                        "label": rows["label"].to_numpy(np.int64), "pred": s["pred"],
                        **{k: values[k] for k in score_columns()}})
    for extra in ("orig_label", "noisy"):
        if extra in rows.columns:
            out[extra] = rows[extra].to_numpy()
    return out


def score_input(path: str | Path, model: str, out_dir: str | Path, p: dict, progress=None, on_input=None):
    """`clean score PATH`: a manifest, an image folder or a `path,label` CSV → out_dir/scores.csv.

    `model` is a trained model folder, or a model name (e.g. resnet18) to train first on
    PATH (into models/<name>, with the recipe of the validated params `p`). A folder or CSV
    is turned into out_dir/input/manifest.csv first (its problems in out_dir/input/problems.csv);
    `on_input(summary, folder)` is called with that summary. Returns (scores DataFrame or
    None on non-zero torchrun ranks, model folder).
    """
    from pipeline.data.standalone import as_manifest

    path, out_dir, model_dir = Path(path), Path(out_dir), Path(model)
    if (model_dir / "config.json").exists():
        from pipeline.models import check_fits_data, read_config

        cfg = read_config(model_dir)
        manifest, summary = as_manifest(path, out_dir / "input", cfg["classes"])
        if on_input:
            on_input(summary, out_dir / "input")
        check_fits_data(cfg, manifest, model_dir)
    else:
        if model_dir.exists() or "/" in model:
            raise CleanError(f"{model_dir}/config.json not found; train a model first (clean train --out {model_dir}) "
                             "or pass a model name such as resnet18 to train one on PATH")
        from pipeline.stages.train import train
        from pipeline.training.recipe import Recipe

        manifest, summary = as_manifest(path, out_dir / "input")
        if on_input:
            on_input(summary, out_dir / "input")
        recipe = Recipe.from_params(p)
        recipe.model = model
        model_dir = Path("models") / model
        if progress:
            progress("log", message=f"training {model} on {manifest} for {recipe.epochs} epoch(s) → {model_dir}")
        train(manifest, model_dir, recipe, seeds=[recipe.seed], progress=progress)
    sc = p["score"]
    df = score(model_dir, manifest, out_dir, norm=sc["norm"], params=sc["params"], batch_size=sc["batch_size"],
               device=p["train"]["device"], split=sc["split"] if manifest == path else "train",
               with_self_influence=sc["self_influence"], progress=progress,
               with_val_influence=sc["val_influence"] and manifest == path,  # a folder/CSV has no val split
               cache_max_gb=p["data"]["cache_max_gb"], workers=p["train"]["workers"], embeddings=sc["embeddings"],
               with_importance=sc["importance"] and manifest == path, importance_dim=sc["importance_dim"])
    return df, model_dir
