"""The `train` stage: a manifest's train split in, a model folder out, one run per seed
(docs/methods.md §5.1).

`train` opens the data (`_open_data`), agrees on the unfinished work in out_dir/.partial
(`_agree_on_partial`: resume it or start over), trains each seed (`_train_seeds`, one
`_train_one` each, through pipeline.training.fit.fit) and puts the finished runs in place
(`_publish`). The recipe is pipeline/training/recipe.py.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline.errors import CleanError
from pipeline.training.recipe import RESULT_NEUTRAL, Recipe

#: where `train` keeps the unfinished work (per-epoch state for --resume) inside out_dir
PARTIAL = ".partial"


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
    from pipeline import distributed as D
    from pipeline.device import resolve_device

    manifest, out_dir = Path(manifest), Path(out_dir)
    if not manifest.exists():
        raise CleanError(f"manifest not found: {manifest}; create it with `clean prepare`")
    seeds = list(seeds) if seeds else [recipe.seed]
    D.setup(resolve_device(recipe.device))
    main = D.is_main()
    if not main:
        progress = None
    classes, tr, val = _open_data(manifest, recipe, progress)
    partial = out_dir / PARTIAL
    done = _agree_on_partial(partial, recipe, seeds, manifest, resume, progress)
    try:
        runs, first = _train_seeds(tr, val, classes, recipe, seeds, done, manifest, partial, progress, resume)
        if not main:
            D.barrier()  # until rank 0 has put the outputs in place (a next command may read them)
            return first
        first = _publish(partial, out_dir, runs)
        D.barrier()
    except BaseException:
        if main and not _resumable(partial):
            shutil.rmtree(partial, ignore_errors=True)
        raise
    return first


def _open_data(manifest: Path, recipe: Recipe, progress) -> tuple:
    """→ (class names, train split, val split or None), in memory or streamed per data.cache_max_gb."""
    from pipeline.data.stream import decoded_bytes, is_streamed, open_split
    from pipeline.formats.manifest import classes_path_for, read_classes, read_manifest

    classes = read_classes(classes_path_for(manifest))["classes"]
    df = read_manifest(manifest, classes)
    opts = dict(df=df, cache_max_gb=recipe.cache_max_gb, workers=recipe.workers)
    tr = open_split(manifest, "train", recipe.image_size, **opts)
    val = open_split(manifest, "val", recipe.image_size, **opts) if (df["split"] == "val").any() else None
    if progress and is_streamed(tr.images):
        gib = decoded_bytes(len(tr), tr.images.shape[1:]) / 2**30
        progress("log", message=f"streaming {len(tr):,} training images from disk ({gib:.1f} GiB decoded > "
                                f"data.cache_max_gb {recipe.cache_max_gb:g}) with {recipe.workers} decode worker(s)")
    return classes, tr, val


def _agree_on_partial(partial: Path, recipe: Recipe, seeds: list[int], manifest: Path, resume: bool,
                      progress) -> list[int]:
    """Rank 0 opens out_dir/.partial (`_open_partial`); every rank gets its decision → the seeds
    already trained (or the same CleanError on every rank)."""
    from pipeline import distributed as D

    decision = None
    if D.is_main():
        try:
            decision = _open_partial(partial, _fingerprint(recipe, seeds, manifest), seeds, resume)
        except CleanError as e:
            decision = {"error": str(e)}
    decision = D.broadcast(decision)
    if "error" in decision:
        raise CleanError(decision["error"])
    if progress and decision["note"]:
        progress("log", message=decision["note"])
    return decision["done"]


def _train_seeds(tr, val, classes, recipe: Recipe, seeds: list[int], done: list[int], manifest: Path,
                 partial: Path, progress, resume: bool) -> tuple[list, dict]:
    """Each seed's run into partial/ (skipping those in `done`) → (one summary per seed, the
    first run's metrics)."""
    from dataclasses import replace

    from pipeline import distributed as D

    main = D.is_main()
    runs, first = [], {}
    for i, seed in enumerate(seeds):
        run_dir = _run_dir(partial, i, seed)
        if seed in done:
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
    return runs, first


def _publish(partial: Path, out_dir: Path, runs: list) -> dict:
    """Rank 0: the finished runs in partial/ replace out_dir's outputs → the first run's metrics
    with `runs`."""
    from pipeline.io import write_json

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
    from pipeline import distributed as D
    from pipeline.training.fit import fit

    if D.is_main():
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
    if D.is_main():
        _write_run(res, tr, classes, recipe, manifest, run_dir, full, metrics)
    return metrics


def _write_run(res, tr, classes, recipe: Recipe, manifest: Path, run_dir: Path, full: bool, metrics: dict) -> None:
    """Rank 0: a finished run's files (weights, config, metrics; dynamics when `full`) into run_dir."""
    import torch
    import timm

    from pipeline.io import atomic_path, write_json
    from pipeline.models import save_weights

    _, c, h, w = tr.images.shape
    cfg = {"model": recipe.model, "num_classes": len(classes), "classes": classes,
           "in_chans": int(c), "image_size": [int(h), int(w)], "mean": res.mean, "std": res.std,
           "recipe": asdict(recipe), "manifest": str(manifest), "n_train": len(tr),
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
