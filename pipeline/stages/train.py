"""The `train` stage: a manifest's train split in, a model folder out, one run per seed
(docs/methods.md §5.1).

`train` opens the data (`_open_data`), agrees on the unfinished work in out_dir/.partial
(`_agree_on_partial`: resume it or start over), trains each seed (`_train_seeds`, one
`_train_one` each, through pipeline.training.fit.fit) and puts the finished runs in place
(`_publish`). The recipe is pipeline/training/recipe.py.

The model folder is owned as a whole (pipeline/ownership.py): a run holds its lock, refuses a
non-empty folder `clean train` did not write, builds the new folder in out_dir/.partial/primary
and swaps it in with one atomic rename, so out_dir is always the complete old or the complete
new model.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import asdict, replace
from importlib.metadata import version
from pathlib import Path

import numpy as np

from pipeline import distributed as D
from pipeline import ownership
from pipeline.data.stream import check_readable, decoded_bytes, is_streamed, open_split
from pipeline.device import resolve_device
from pipeline.errors import CleanError
from pipeline.formats.manifest import classes_path_for, read_classes, read_manifest
from pipeline.io import atomic_path, write_json
from pipeline.models import save_weights, write_config
from pipeline.ownership import MARKER
from pipeline.training.fit import fit
from pipeline.training.recipe import RESULT_NEUTRAL, Recipe
from pipeline.training.resume import STATE_JSON

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
    created = main and not out_dir.exists()
    with contextlib.ExitStack() as hold:  # rank 0: the lock on out_dir, released at the end
        done = _agree_on_partial(partial, recipe, seeds, manifest, resume, progress, hold)
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
                _remove_if_only_marker(out_dir, created)
            raise
    return first


def _owned(out_dir: Path, hold) -> None:
    """Rank 0: lock out_dir (held by `hold`), finish or undo a swap a kill interrupted, and
    claim the folder (refused when it holds files `clean train` did not write)."""

    hold.enter_context(ownership.locked(out_dir))
    ownership.recover(out_dir, work=PARTIAL)
    ownership.claim(out_dir)


def _remove_if_only_marker(out_dir: Path, created: bool) -> None:
    """A folder this run created and left with nothing but its marker is removed again."""

    if created and out_dir.is_dir() and [p.name for p in out_dir.iterdir()] == [MARKER]:
        shutil.rmtree(out_dir, ignore_errors=True)


def _open_data(manifest: Path, recipe: Recipe, progress) -> tuple:
    """→ (class names, train split, val split or None), in memory or streamed per data.cache_max_gb."""

    info = read_classes(classes_path_for(manifest))
    classes = info["classes"]
    df = read_manifest(manifest, classes)
    opts = dict(df=df, cache_max_gb=recipe.cache_max_gb, workers=recipe.workers)
    tr = open_split(manifest, "train", _image_size(recipe, info), **opts)
    # the validation images at the training images' size and channels, whatever their own
    val = (open_split(manifest, "val", list(tr.images.shape[2:]), tr.images.shape[1], **opts)
           if (df["split"] == "val").any() else None)
    if val is not None and is_streamed(val.images):
        check_readable(val.images, progress)  # a broken one is named now, not after the first epoch
    if progress and is_streamed(tr.images):
        gib = decoded_bytes(len(tr), tr.images.shape[1:]) / 2**30
        progress("log", message=f"streaming {len(tr):,} training images from disk ({gib:.1f} GiB decoded > "
                                f"data.cache_max_gb {recipe.cache_max_gb:g}) with {recipe.workers} decode worker(s)")
    return classes, tr, val


def _image_size(recipe: Recipe, info: dict):
    """data.image_size, else the dataset's size from classes.json (`clean prepare` records the
    most common one when the images differ), else None (the first training image's)."""
    if recipe.image_size is not None:
        return recipe.image_size
    size = info.get("image_size")
    ok = (isinstance(size, list) and len(size) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size))
    return size if ok else None


def _agree_on_partial(partial: Path, recipe: Recipe, seeds: list[int], manifest: Path, resume: bool,
                      progress, hold) -> list[int]:
    """Rank 0 takes out_dir (`_owned`) and opens out_dir/.partial (`_open_partial`); every rank
    gets its decision → the seeds already trained (or the same CleanError on every rank)."""

    decision = None
    if D.is_main():
        try:
            _owned(partial.parent, hold)
            decision = _open_partial(partial, _fingerprint(recipe, seeds, manifest, partial.parent), seeds, resume)
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
    """Rank 0: the finished model folder partial/primary (with the other seeds' runs in its
    seeds/) replaces out_dir in one atomic swap → the first run's metrics with `runs`.

    Steps: metrics.json gets `runs`; leftover training states go; the marker is written
    (the folder is complete); it is renamed beside out_dir and swapped in (the old version,
    with .partial, is then removed). A kill between any two leaves out_dir complete (old or
    new) and `ownership.recover` finishes the swap on the next run."""
    primary = partial / "primary"
    first = json.loads((primary / "metrics.json").read_text())
    first["runs"] = runs
    write_json(primary / "metrics.json", first)
    for leftover in sorted(primary.rglob("resume")):
        shutil.rmtree(leftover, ignore_errors=True)
    ownership.mark(primary)
    staged = ownership.staging_path(out_dir)
    os.rename(primary, staged)
    ownership.swap_in(staged, out_dir)
    return first


def _run_dir(partial: Path, i: int, seed: int) -> Path:
    """partial/primary is the new model folder; the other seeds' runs go to its seeds/."""
    return partial / "primary" if i == 0 else partial / "primary" / "seeds" / f"seed_{seed}"


def _fingerprint(recipe: Recipe, seeds: list[int], manifest: Path, out_dir: Path) -> dict:
    """What a resumed run must share with the interrupted one (JSON-normalised). The manifest
    is named relative to the model folder, so a project that was moved or copied as a whole
    (a `dvc exp run` workspace, another mount point) still resumes."""

    r = {k: v for k, v in asdict(recipe).items() if k not in RESULT_NEUTRAL and k != "seed"}
    where = Path(os.path.relpath(manifest.resolve(), out_dir.resolve())).as_posix()
    fp = {"recipe": r, "seeds": list(seeds), "manifest": where,
          "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()}
    return json.loads(json.dumps(fp))


def _open_partial(partial: Path, fp: dict, seeds: list[int], resume: bool) -> dict:
    """Rank 0: reuse out_dir/.partial when resuming a run with the same settings, else start it
    afresh → {done: seeds already trained, note: a line for the user or None}."""
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
    return partial.exists() and (any(partial.rglob(STATE_JSON)) or any(partial.rglob("metrics.json")))


def _train_one(tr, val, classes, recipe: Recipe, manifest: Path, run_dir: Path, full: bool, progress=None,
               resume: bool = False) -> dict:
    """One seed's run into run_dir (dynamics + checkpoints only when `full`). Returns metrics.

    The run's training state goes to run_dir/resume/ at every checkpoint epoch (removed
    once the run's files are written)."""

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


def mean_probs(probs_sum: np.ndarray, epochs: int) -> np.ndarray:
    """Mean over the first `epochs` epochs of each sample's pre-update softmax [N, C] (float16 past 2**24 values)."""
    mean = probs_sum / max(epochs, 1)
    return mean.astype(np.float16 if mean.size > 2**24 else np.float32)


def _write_run(res, tr, classes, recipe: Recipe, manifest: Path, run_dir: Path, full: bool, metrics: dict) -> None:
    """Rank 0: a finished run's files (weights, config, metrics; dynamics when `full`) into run_dir."""

    import torch

    _, c, h, w = tr.images.shape
    cfg = {"model": recipe.model, "num_classes": len(classes), "classes": classes,
           "in_chans": int(c), "image_size": [int(h), int(w)], "mean": res.mean, "std": res.std,
           "recipe": asdict(recipe), "manifest": str(manifest), "n_train": len(tr),
           "checkpoints": res.checkpoints, "history": res.history,
           "versions": {"torch": torch.__version__.split("+")[0], "timm": version("timm")}}
    dyn = dict(res.dynamics)
    probs = mean_probs(dyn.pop("probs_sum"), min(len(res.history), recipe.probs_epochs))
    if full:
        with atomic_path(run_dir / "dynamics.npz") as tmp:
            with open(tmp, "wb") as f:
                track_ids = tr.ids[dyn.pop("track_pos")]
                np.savez(f, ids=tr.ids, labels=tr.labels, track_ids=track_ids,
                         lr=np.array([r["lr"] for r in res.history], np.float64), probs=probs, **dyn)
    else:  # the other seeds keep their mean softmax: the label rule averages it over seeds
        with atomic_path(run_dir / "probs.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, ids=tr.ids, probs=probs)
    save_weights(res.model, run_dir / "model.safetensors", {"model": recipe.model, "seed": recipe.seed})
    write_config(run_dir, cfg)
    write_json(run_dir / "metrics.json", metrics)
    shutil.rmtree(run_dir / "resume", ignore_errors=True)
