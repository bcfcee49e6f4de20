"""The `score` stage: one row per training sample with every per-sample importance score.

Columns (docs/methods.md §1): loss, grad_norm (‖∇_θ' L_i‖ for the chosen norm and parameter
subset), el2n ‖p − e_y‖₂, margin z_y − max_{k≠y} z_k, the training-dynamics scores aum,
forgetting, confidence, variability, self_influence Σ_c lr_c ‖∇_θ' L_i(θ_c)‖₂² (TracIn) and
val_influence Σ_c lr_c ⟨∇_θ' L_i(θ_c), ∇_θ' L̄_val(θ_c)⟩ (L̄_val: mean loss over the validation
split) over the saved epoch checkpoints. Model in eval mode; batched tensor math throughout.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import distributed as D
from pipeline.config import ScoreConfig
from pipeline.data.stream import is_streamed, open_split
from pipeline.device import resolve_device
from pipeline.errors import CleanError
from pipeline.formats.manifest import classes_path_for, read_classes, read_manifest
from pipeline.io import atomic_path, together, write_frame, write_json
from pipeline.models import load_trained
from pipeline.params import CHOICES
from pipeline.registry import SCORES
from pipeline.scores import features
from pipeline.scores.features import FEATURE_KEYS, empty_features, image_features
from pipeline.scores.inputs import ScoreInputs
from pipeline.stages.standalone import as_manifest


def score_columns() -> list[str]:
    """The score columns of scores.csv, in order (the SCORES registry)."""
    return SCORES.names()


def columns() -> list[str]:
    """Every column of scores.csv: id, path, label, pred, then the score columns."""
    return ["id", "path", "label", "pred"] + score_columns()


def score(model_dir: str | Path, manifest: str | Path, out_dir: str | Path, config: ScoreConfig = ScoreConfig(),
          progress=None):
    """Stage: score every sample of `config.split` → out_dir/scores.csv + out_dir/meta.json
    (+ out_dir/embeddings.npz with `config.embeddings`: every split's penultimate features, pixel
    hashes and image statistics for flag's duplicate / outlier / image checks).

    Returns the scores DataFrame (one row per sample, columns :func:`columns` [+ orig_label,
    noisy]). Every score family of the SCORES registry runs once on this rank's samples.
    Images whose decoded size exceeds `config.cache_max_gb` GiB are streamed from disk, decoded
    by `config.workers` processes (same scores). Under torchrun each rank scores a contiguous
    block of samples (cut at batch boundaries, so every sample sits in the same batch as in one
    process); rank 0 gathers the blocks and writes the files; the other ranks return None.
    """
    _check_settings(config)
    t0 = time.perf_counter()
    model_dir, manifest, out_dir = Path(model_dir), Path(manifest), Path(out_dir)
    device = D.setup(resolve_device(config.device))
    progress = progress if D.is_main() else None
    model, cfg = load_trained(model_dir, device)
    df, rows = _rows(manifest, cfg, model_dir, config.split)
    inputs = _inputs(model, cfg, manifest, df, rows, model_dir, device, progress, config)
    if progress:
        where = f", rank 0 of {D.world_size()}" if D.enabled() else ""
        progress("start", desc=f"score ({config.norm}, {config.subset}{where})",
                 total=(1 + len(inputs.checkpoints) + len(inputs.val_checkpoints)) * len(inputs.labels))
    s = {}
    for family in SCORES.families():
        s.update(family(inputs, config))
    if progress:
        progress("end")
    parts = D.gather(s)
    if not D.is_main():
        D.barrier()  # until rank 0 has written the files
        return None
    s = {k: np.concatenate([p[k] for p in parts if k in p]) for k in s}
    _check_finite(s, model_dir, config.split)
    out = _write(out_dir, s, model, cfg, manifest, df, rows, inputs, config, device, progress, t0)
    D.barrier()
    return out


def _inputs(model, cfg: dict, manifest: Path, df, rows, model_dir: Path, device: str, progress,
            config: ScoreConfig) -> ScoreInputs:
    """This rank's block of `rows` with the checkpoints and validation split the TracIn families need."""
    lo, hi = D.shard(len(rows), config.batch_size)  # this rank's block; one process: everything
    images, labels = _open_block(manifest, df, rows, cfg, config.split, lo, hi, config.cache_max_gb, config.workers)
    ckpts = _checkpoints(model_dir, cfg) if config.self_influence else []
    if config.self_influence and not ckpts:
        raise CleanError(f"{model_dir}/checkpoints has no epoch checkpoints for self-influence; retrain "
                         "with `clean train` (train.checkpoint_every) or set score.self_influence: false")
    vckpts, val = (_val_inputs(manifest, df, cfg, model_dir, config.cache_max_gb, config.workers,
                               config.val_influence) if config.val_influence or config.importance else ([], None))
    val = _reference(model, val, cfg, config.batch_size, device) if val is not None else None
    return ScoreInputs(model, images, labels, rows["id"].to_numpy(np.int64)[lo:hi], cfg["mean"], cfg["std"], model_dir,
                       device, progress, ckpts, vckpts, val)


def _write(out_dir: Path, s: dict, model, cfg: dict, manifest: Path, df, rows, inputs: ScoreInputs,
           config: ScoreConfig, device: str, progress, t0: float):
    """scores.csv, meta.json (and embeddings.npz) as one change → the scores DataFrame."""
    scored = {k: s.pop(k) for k in FEATURE_KEYS if k in s}  # the scored rows' features, from the same pass
    s_ids = rows["id"].to_numpy(np.int64)
    n_dyn = int(s.pop("with_dynamics").sum())
    with together(out_dir):  # scores.csv, meta.json (and embeddings.npz) change as one
        if config.embeddings:
            _write_features(out_dir / "embeddings.npz", model, manifest, df, df["id"].isin(rows["id"]).to_numpy(),
                            scored, cfg, config, device, progress, inputs.model_dir)
        attribution = _write_attribution(out_dir / "attribution.npz", s, s_ids)
        out = _frame(rows, s)
        write_frame(out_dir / "scores.csv", out)
        write_json(out_dir / "meta.json", {
            "norm": config.norm, "params": config.subset, "model_dir": str(inputs.model_dir), "model": cfg["model"],
            "manifest": str(manifest), "split": config.split, "n": int(len(out)), "n_with_dynamics": n_dyn,
            "dynamics_epochs": len(cfg.get("history", [])),
            "dynamics_source": "each sample's minibatch forward pass during training, before the update",
            "self_influence": {"computed": bool(config.self_influence), "norm": "l2 squared", "params": config.subset,
                               "checkpoints": [{"file": p.name, "lr": lr} for p, lr in inputs.checkpoints]},
            "val_influence": {"computed": inputs.val is not None and config.val_influence, "params": config.subset,
                              "n_val": 0 if inputs.val is None else inputs.val.n_val,
                              "n_reference": 0 if inputs.val is None else len(inputs.val.labels),
                              "checkpoints": [{"file": p.name, "lr": lr} for p, lr in inputs.val_checkpoints]},
            "importance": attribution,
            "seconds": round(time.perf_counter() - t0, 3), "columns": list(out.columns),
            "processes": D.world_size(), "streamed": bool(is_streamed(inputs.images)),
        })
    return out


def _write_features(path: Path, model, manifest: Path, df, scored_mask: np.ndarray, scored: dict, cfg: dict,
                    config: ScoreConfig, device: str, progress, model_dir: Path) -> None:
    """embeddings.npz for every row of the manifest: ids, split, emb [M, D] float16, hash, image stats
    (+ emb_1, … [M, D] and emb_seeds [S]: the other seed models' embeddings, with config.seed_embeddings).

    `scored` holds the features of the rows where `scored_mask` [M] is true (from the scoring
    pass, in manifest order); only the other rows are decoded and forwarded here."""
    if not scored:
        scored_mask = np.zeros(len(df), bool)
    rest = df[~scored_mask]
    extra = {}
    if len(rest):
        data = open_split(manifest, "all", cfg["image_size"], cfg["in_chans"], df=df, cache_max_gb=config.cache_max_gb,
                          workers=config.workers, rows=rest)
        if progress:
            progress("start", desc="embed the other splits", total=len(rest))
        extra = image_features(model, data.images, cfg["mean"], cfg["std"], config.batch_size, device, progress)
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
        height, width = features.native_sizes(df["path"].tolist(), manifest.parent)
    if config.seed_embeddings:
        feats.update(_seed_embeddings(model_dir, manifest, df, cfg, config, device, progress))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, ids=df["id"].to_numpy(np.int64), split=df["split"].to_numpy().astype("U5"),
                     label=df["label"].to_numpy(np.int64), height=height, width=width, **feats)


def _seed_embeddings(model_dir: Path, manifest: Path, df, cfg: dict, config: ScoreConfig, device: str,
                     progress) -> dict:
    """The other seed models' embeddings of every manifest row (model_dir/seeds/seed_<s>, `clean train` with
    several train.seeds) → {"emb_1": float16 [M, D], …, "emb_seeds": int64 [S] (the scored model's seed first)};
    {} with one seed. The outlier check averages the seeds' kNN distances (pipeline/rules/outliers.py)."""
    from pipeline.models import run_dirs

    runs = run_dirs(model_dir)[1:]
    if not runs:
        return {}
    data = open_split(manifest, "all", cfg["image_size"], cfg["in_chans"], df=df, cache_max_gb=config.cache_max_gb,
                      workers=config.workers, rows=df)
    out, seeds = {}, [_seed_of(cfg)]
    for i, run in enumerate(runs, 1):
        other, ocfg = load_trained(run, device)
        if list(ocfg["classes"]) != list(cfg["classes"]) or list(ocfg["image_size"]) != list(cfg["image_size"]):
            raise CleanError(f"{run} was trained on other classes or image size than {model_dir}; retrain both with "
                             f"`clean train --out {model_dir}` (or set score.seed_embeddings: false)")
        if progress:
            progress("start", desc=f"embed with {run.name}'s model", total=len(df))
        out[f"emb_{i}"] = features.embed(other, data.images, ocfg["mean"], ocfg["std"], config.batch_size, device,
                                         progress)
        if progress:
            progress("end")
        seeds.append(_seed_of(ocfg))
        del other
    out["emb_seeds"] = np.asarray(seeds, np.int64)
    return out


def _seed_of(cfg: dict) -> int:
    """The training seed in a model's config.json (−1 when it does not say)."""
    seed = (cfg.get("recipe") or {}).get("seed")
    return int(seed) if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) else -1


def _check_finite(s: dict, model_dir: Path, split: str) -> None:
    """CleanError when the model's loss is NaN/inf on some images (broken weights or config
    numbers): scores.csv is never written with such rows."""
    bad = ~np.isfinite(np.asarray(s["loss"], np.float64))
    if bad.any():
        raise CleanError(f"{model_dir}: the model gives a NaN/inf loss on {int(bad.sum())} of {len(bad)} '{split}' "
                         "images, so no score would mean anything; its weights or config.json are broken: retrain "
                         f"it with `clean train --out {model_dir}`")


def _check_settings(config: ScoreConfig) -> None:
    for key, value in (("score.norm", config.norm), ("score.params", config.subset), ("score.split", config.split)):
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
    if hi <= lo:  # more processes than batches: nothing to do here
        return np.zeros((0, cfg["in_chans"], *cfg["image_size"]), np.uint8), np.zeros(0, np.int64)
    # each rank decodes only its block (size and channels are fixed by the model's config)
    mine = rows.iloc[lo:hi] if (D.enabled() or split == "all") else None
    data = open_split(manifest, split, cfg["image_size"], cfg["in_chans"], df=df, cache_max_gb=cache_max_gb,
                      workers=workers, rows=mine)
    return data.images, data.labels


def _val_inputs(manifest: Path, df, cfg: dict, model_dir: Path, cache_max_gb: float, workers: int,
                with_checkpoints: bool = True):
    """(checkpoints, validation Split) for val_influence and importance; CleanError without either
    (checkpoints only `with_checkpoints`: val_influence)."""
    if not (df["split"] == "val").any():
        raise CleanError(f"{manifest} has no 'val' rows, and val_influence measures each training image's effect on "
                         "the validation loss: re-run `clean prepare` with data.val_frac > 0, or set "
                         "score.val_influence: false and score.importance: false")
    ckpts = _checkpoints(model_dir, cfg) if with_checkpoints else []
    if with_checkpoints and not ckpts:
        raise CleanError(f"{model_dir}/checkpoints has no epoch checkpoints for val_influence; retrain with "
                         "`clean train` (train.checkpoint_every) or set score.val_influence: false")
    return ckpts, open_split(manifest, "val", cfg["image_size"], cfg["in_chans"], df=df, cache_max_gb=cache_max_gb,
                             workers=workers)


def _reference(model, val, cfg: dict, batch_size: int, device: str):
    """The validation rows trusted as the target of val_influence and importance: those that are
    not label issues per pipeline.rules.labels.heldout_label_issues on the model's out-of-sample
    softmax → a Split-like namespace: images, labels, ids (those rows), mask [V] bool, n_val."""
    from types import SimpleNamespace

    from pipeline.rules.labels import reference_rows
    from pipeline.scores.attribution import val_probs

    mask = reference_rows(val.labels, val_probs(model, val.images, val.labels, cfg["mean"], cfg["std"], batch_size,
                                                device))
    pos = np.flatnonzero(mask)
    if is_streamed(val.images):
        from pipeline.data.stream import StreamImages

        v = val.images
        images = StreamImages(v.paths[pos], v.base_dir, v.chw, v.workers)
    else:
        images = val.images[pos]
    return SimpleNamespace(images=images, labels=np.asarray(val.labels)[pos], ids=np.asarray(val.ids)[pos], mask=mask,
                           n_val=len(mask))


def _write_attribution(path: Path, s: dict, ids: np.ndarray) -> dict | None:
    """attribution.npz from the importance family's extras (popped from `s`): ids [N], effects
    [M, N] (nats, calibrated), val_ids [V], val_loss [M, V] (each seed model's loss of each
    reference validation row), calibration [M] (each model's 1/r̄, the Gauss–Newton scale in its
    effects). Without them (score.importance: false, torchrun) M = V = 0, so the file the DVC stage
    declares exists. → the meta.json entry."""
    from pipeline.scores.importance import EXTRAS

    got = {k: s.pop(k) for k in EXTRAS if k in s}
    n = len(ids)
    eff = got["attribution_effects"].T if got else np.zeros((0, n))
    vl = got["attribution_val_loss"].T if got else np.zeros((0, 0))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, ids=ids, effects=eff, val_ids=got.get("attribution_val_ids", np.zeros(0, np.int64)),
                     val_loss=vl, calibration=np.asarray(got.get("attribution_calibration", np.zeros(0)), np.float64))
    return {"file": path.name, "models": int(eff.shape[0]), "n_reference_val": int(vl.shape[1])} if got else None


def _checkpoints(model_dir: Path, cfg: dict) -> list[tuple[Path, float]]:
    """The saved epoch checkpoints [(file, lr)] that exist."""
    ckpts = [(model_dir / "checkpoints" / c["file"], float(c["lr"])) for c in cfg.get("checkpoints", [])]
    return [(p, lr) for p, lr in ckpts if p.exists()]


def _frame(rows, s: dict):
    """scores.csv as a DataFrame: id, path, label, pred, every score column (+ noise truth)."""
    out = pd.DataFrame({"id": rows["id"].to_numpy(np.int64), "path": rows["path"].to_numpy(),
                        "label": rows["label"].to_numpy(np.int64), "pred": s["pred"],
                        **{k: s[k] for k in score_columns()}})
    for extra in ("orig_label", "noisy"):
        if extra in rows.columns:
            out[extra] = rows[extra].to_numpy()
    return out


def score_input(path: str | Path, model: str, out_dir: str | Path, config, progress=None, on_input=None):
    """`clean score PATH`: a manifest, an image folder or a `path,label` CSV → out_dir/scores.csv.

    `model` is a trained model folder, or a model name (e.g. resnet18) to train first on
    PATH (into models/<name>, with `config.train`, the recipe; `config`: a pipeline.config.Config). A folder or CSV
    is turned into out_dir/input/manifest.csv first (its problems in out_dir/input/problems.csv);
    `on_input(summary, folder)` is called with that summary. Returns (scores DataFrame or
    None on non-zero torchrun ranks, model folder).
    """

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

        manifest, summary = as_manifest(path, out_dir / "input")
        if on_input:
            on_input(summary, out_dir / "input")
        recipe = dataclasses.replace(config.train, model=model)
        model_dir = Path("models") / model
        if progress:
            progress("log", message=f"training {model} on {manifest} for {recipe.epochs} epoch(s) → {model_dir}")
        train(manifest, model_dir, recipe, seeds=[recipe.seed], progress=progress)
    sc = config.score if manifest == path else dataclasses.replace(  # a folder/CSV has no val split
        config.score, split="train", val_influence=False, importance=False)
    return score(model_dir, manifest, out_dir, sc, progress=progress), model_dir
