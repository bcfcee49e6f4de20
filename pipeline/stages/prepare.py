"""The prepare stage: source -> data/manifest.csv, data/classes.json, data/problems.csv."""
from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.config import PrepareConfig
from pipeline.errors import CleanError
from pipeline.formats.manifest import REQUIRED, relative_ref, repository_root
from pipeline.paths import check_io
from pipeline.progress import Progress
from pipeline.data.images import channels_of, split_ref
from pipeline.io import together, write_csv, write_json
from pipeline.data.noise import inject_noise, validate_noise
from pipeline.data.sources import Record, load_source
from pipeline.data.split import SPLITS, SplitWarning, assign_splits, validate_fractions

NOISE_COLUMNS = ["orig_label", "noisy"]


def _sort_key(r: Record):
    file, idx = split_ref(r.path)
    return (r.split or "", file, -1 if idx is None else idx)


def manifest_path(path: str, out_dir: str, root: str | None = None) -> str:
    """`path` as the manifest in `out_dir` lists it (formats/manifest.py relative_ref): relative
    when the file lies inside the repository `root` (None: inside `out_dir`), else absolute.

    Works on ``file#i`` IDX refs too (the file part is rewritten).
    """
    file, idx = split_ref(path)
    a = relative_ref(file, out_dir, root)
    return a if idx is None else f"{a}#{idx}"


def _outside_note(paths: list[str], root) -> str | None:
    """A line for the summary when manifest `paths` name images outside the repository `root`."""
    out = [p for p in paths if os.path.isabs(p)]
    if not out:
        return None
    return (f"{len(out)} image(s) lie outside the repository {root} (e.g. {split_ref(out[0])[0]}): the manifest "
            "lists them by absolute path, so a clone at another path will not find them. Bring them in: copy "
            "the folder under data/ (or `dvc import` it), `dvc add` it and set data.root to it")


def _check_outputs_beside_images(records: list[Record], out_dir: Path) -> None:
    """CleanError when a file prepare writes would land in a folder of source images (or be
    an IDX file it reads): the source is never written to (pipeline/paths.py)."""

    held = {}
    for r in records:
        file, idx = split_ref(r.path)
        held[file if idx is not None else os.path.dirname(file)] = None
    check_io("prepare", [("{} (a folder of source images)", d) for d in held],
             [("--out", out_dir / f) for f in ("manifest.csv", "classes.json", "problems.csv")])


def _common_size(recs: list[Record]) -> tuple[list[int] | None, str | None]:
    """The dataset's image size [H, W] (the most common one; the first in manifest order on a
    tie) and, when the images have several sizes, a line saying what happens to the others.

    classes.json records it and `clean train` resizes every image of every split to it
    (unless data.image_size is set), so mixed sizes are legitimate input."""

    sizes = Counter(tuple(int(v) for v in r.size) for r in recs if r.size)
    if not sizes:
        return None, None
    (h, w), _ = sizes.most_common(1)[0]
    if len(sizes) == 1:
        return [h, w], None
    shown = ", ".join(f"{a}x{b} ({n})" for (a, b), n in sizes.most_common(4)) + (", ..." if len(sizes) > 4 else "")
    return [h, w], (f"the images have {len(sizes)} sizes (HxW: {shown}); training resizes every image to "
                    f"{h}x{w}, the most common one: set data.image_size to choose another size")


def _resolve_pairs(pairs: dict | None, names: list[str]) -> dict[int, int] | None:
    """Accept class names or indices on both sides of noise.pairs -> {index: index}."""
    if pairs is None:
        return None
    lookup = {n: i for i, n in enumerate(names)}

    def one(v):
        if isinstance(v, str) and v in lookup:
            return lookup[v]
        try:
            i = int(v)
        except (TypeError, ValueError):
            i = -1
        if isinstance(v, bool) or not 0 <= i < len(names):
            raise CleanError(f"noise.pairs: {v!r} is not a class; use class indices 0..{len(names) - 1} "
                             f"or names from classes.json")
        return i
    return {one(a): one(b) for a, b in pairs.items()}


def prepare(out_dir: str | Path, config: PrepareConfig = PrepareConfig(), progress: Progress = None) -> dict:
    """Read the source `config.source` (at `config.root`), split it, optionally corrupt labels,
    write the three data files into `out_dir`.

    Writes (atomically) `out_dir`/manifest.csv (id,path,label,split[,orig_label,noisy]),
    classes.json and problems.csv (path,reason). `progress` (pipeline/progress.py) reports
    image checking/export. Noise touches only the splits in `config.noise_splits` (default
    train; round(rate x their images) labels change, drawn over them together); orig_label/noisy
    are kept for every split. Returns a summary: source, num_samples, num_classes, in_chans,
    image_size, counts {split: n}, per_class {name: n}, per_class_split {name: {split: n}},
    n_problems, n_noisy, warnings (list of str, e.g. unstratified-split fallbacks).
    Same arguments -> byte-identical files. Source images are never modified. The three
    files are replaced together (pipeline/io.together): an interrupted or failed run leaves
    all of the old ones.
    """
    c = config
    validate_fractions(c.val_frac, c.test_frac)
    validate_noise(c.noise_rate, c.noise_kind)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CleanError(f"--out {out_dir} is a file; give a folder for manifest.csv, classes.json and problems.csv")
    (out_dir / "images").mkdir(parents=True, exist_ok=True)  # exported images (a DVC output, always present)
    out_abs = os.path.abspath(out_dir)
    repo = repository_root(out_dir)
    src = load_source(c.source, c.root, out_dir, c.classes, progress)
    _check_outputs_beside_images(src.records, out_dir)
    recs = sorted(src.records, key=_sort_key)
    names = src.classes
    index = {n: i for i, n in enumerate(names)}
    labels = np.array([index[r.label] for r in recs], dtype=np.int64)
    splits, notes = _splits(recs, labels, names, src.notes, c)
    noisy_labels = None
    if c.noise_rate > 0:
        pairs = _resolve_pairs(c.noise_pairs, names) if c.noise_kind == "pairs" else None
        noisy_labels = inject_noise(labels, len(names), c.noise_rate, c.noise_kind, c.noise_seed,
                                    pairs=pairs, mask=np.isin(splits, list(c.noise_splits)))
    paths = [manifest_path(r.path, out_abs, repo) for r in recs]
    header, rows, n_noisy = _manifest_rows(paths, labels, splits, noisy_labels)
    final = labels if noisy_labels is None else noisy_labels
    outside = _outside_note(paths, repo) if repo is not None and c.root is not None else None
    if outside:
        notes.append(outside)
    in_chans = max(channels_of(r.mode or "L") for r in recs)  # 3 when any image has color
    image_size, size_note = _common_size(recs)
    if size_note:
        notes.append(size_note)
    counts = {s: int((splits == s).sum()) for s in SPLITS}
    per_class_split = {n: {s: int(((final == k) & (splits == s)).sum()) for s in SPLITS}
                       for k, n in enumerate(names)}
    problems = sorted((manifest_path(p.path, out_abs, repo), p.reason) for p in src.problems)

    with together(out_dir):  # the three files change as one (all old or all new)
        write_csv(out_dir / "problems.csv", ["path", "reason"], problems)
        write_json(out_dir / "classes.json", {
            "classes": names, "source": c.source, "in_chans": in_chans, "image_size": image_size,
            # every image has exactly image_size as stored: later stages need no per-file size read
            "uniform_size": image_size is not None and size_note is None and all(r.size for r in recs),
            "num_samples": len(recs), "counts": counts,
        })
        write_csv(out_dir / "manifest.csv", header, rows)
    return {"source": c.source, "num_samples": len(recs), "num_classes": len(names), "in_chans": in_chans,
            "image_size": image_size, "counts": counts,
            "per_class": {n: sum(d.values()) for n, d in per_class_split.items()},
            "per_class_split": per_class_split, "n_problems": len(problems), "n_noisy": n_noisy, "warnings": notes}


def _splits(recs: list[Record], labels: np.ndarray, names: list[str], source_notes: list[str],
            c: PrepareConfig) -> tuple[np.ndarray, list[str]]:
    """(split per record [N] str, notes for the summary); CleanError when fewer than 2 classes
    (of a source without a fixed class list) have readable images."""
    present = np.bincount(labels, minlength=len(names))
    if int((present > 0).sum()) < 2:
        raise CleanError(f"{c.source} source {c.root}: only class {names[int(np.argmax(present))]!r} has readable "
                         "images; a classifier needs at least 2 classes (check data.root"
                         + (" and data.classes" if c.classes is not None else "") + "; unreadable files are in "
                         "problems.csv)")
    empty_classes = [n for n, k in zip(names, present) if k == 0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SplitWarning)
        splits = assign_splits(labels, [r.split for r in recs], c.val_frac, c.test_frac, c.seed)
    notes = list(source_notes) + [str(w.message) for w in caught if issubclass(w.category, SplitWarning)]
    if empty_classes:
        notes.append(f"{len(empty_classes)} class(es) have no readable image: {', '.join(empty_classes[:10])}"
                     f"{' ...' if len(empty_classes) > 10 else ''} (see problems.csv)")
    for w in caught:
        if not issubclass(w.category, SplitWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    _check_train(labels[splits == "train"], names, c)
    return splits, notes


def _check_train(train_labels: np.ndarray, names: list[str], c: PrepareConfig) -> None:
    """CleanError now, at prepare, when the train split cannot train a classifier (no image, or
    one class only: every row of the source's own split column says val/test), not at train/score."""
    held = sorted({names[int(k)] for k in np.unique(train_labels)})
    if len(held) >= 2:
        return
    what = "no image" if not held else f"images of class {held[0]!r} only"
    raise CleanError(f"{c.source} source {c.root}: the train split holds {what}: the source's own splits (a CSV "
                     "`split` column, or train/val/test folders) put the rest in val/test; give at least 2 classes "
                     "of images the split train (or an empty split: data.val_frac / data.test_frac then carve "
                     "val and test from them)")


def _manifest_rows(paths: list[str], labels: np.ndarray, splits: np.ndarray, noisy_labels: np.ndarray | None):
    """(header, rows, n_noisy) of manifest.csv: id,path,label,split (+ orig_label,noisy with noise)."""
    header = list(REQUIRED)
    if noisy_labels is None:
        return header, [(i, p, int(y), s) for i, (p, y, s) in enumerate(zip(paths, labels, splits))], 0
    flags = (noisy_labels != labels).astype(int)
    rows = [(i, p, int(y), s, int(o), int(f))
            for i, (p, y, s, o, f) in enumerate(zip(paths, noisy_labels, splits, labels, flags))]
    return header + NOISE_COLUMNS, rows, int(flags.sum())
