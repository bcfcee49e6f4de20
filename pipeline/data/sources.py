"""Read a dataset source into labelled records plus a list of problems.

Sources: ``digits`` (scikit-learn's bundled 8x8 digits, exported once as PNGs),
``fashion-mnist`` (IDX files), ``imagefolder`` (``root/<class>/<image>``, or with the user's
own splits ``root/{train,val,test}/<class>/<image>``) and ``csv`` (columns ``path,label`` and
an optional ``split``). Every unreadable image, missing file or bad label becomes a
:class:`Problem`; nothing is dropped silently. Source images are never modified.
"""
from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import CleanError
from pipeline.progress import Progress, Ticker
from pipeline.registry import SOURCES
from pipeline.data.images import describe_failure, probe_image, read_idx
from pipeline.io import atomic_path

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
DIGITS_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_FASHION_FIX = ("install it with `apt-get install -y dataset-fashion-mnist`, or set data.root "
                "to a folder holding the four Fashion-MNIST IDX files")



@dataclass(frozen=True, slots=True)
class Record:
    """One usable image: absolute path (or ``idxfile#i``), class name, official split or None.

    `mode` (PIL mode) and `size` ((H, W)) are filled when known from decoding.
    """
    path: str
    label: str
    split: str | None = None
    mode: str | None = field(default=None, compare=False)
    size: tuple[int, int] | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Problem:
    """One input that could not be used, with a short human reason."""
    path: str
    reason: str


@dataclass
class Source:
    """Everything read from a source: usable records, problems and the class list."""
    kind: str
    records: list[Record]
    problems: list[Problem]
    classes: list[str]
    notes: list[str] = field(default_factory=list)  # one-line remarks for the prepare summary


#: folder names (case-insensitive) / CSV `split` values naming the user's own splits
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def read_source(kind: str, root: str | os.PathLike | None, out_dir: Path,
                classes: list[str] | None = None) -> tuple[list[Record], list[Problem]]:
    """Read source `kind` -> (records, problems). See :func:`load_source`."""
    src = load_source(kind, root, out_dir, classes)
    return src.records, src.problems


def load_source(kind: str, root: str | os.PathLike | None, out_dir: Path,
                classes: list[str] | None = None, progress: Progress | None = None) -> Source:
    """Read source `kind` into a :class:`Source` (records, problems, class names).

    `root`: folder / CSV file / IDX folder (None = the source's default; required for
    imagefolder and csv). `out_dir`: where ``digits`` exports its PNGs. `classes`: fixed
    class list (other labels become problems). `progress` (pipeline/progress.py) reports
    the images being checked. No readable image at all -> CleanError.
    """
    if classes is not None:
        classes = [str(c) for c in classes]
        if not classes or len(set(classes)) != len(classes):
            raise CleanError(f"data.classes must be a non-empty list of distinct names, got {classes!r}")
    if kind not in SOURCES:
        raise CleanError(f"unknown data source {kind!r}; data.source must be one of: {', '.join(SOURCES)}")
    src = SOURCES[kind].fn(root, Path(out_dir), classes, progress)
    if not src.records:
        shown = "; ".join(f"{p.path}: {p.reason}" for p in src.problems[:3])
        more = f" (and {len(src.problems) - 3} more)" if len(src.problems) > 3 else ""
        raise CleanError(f"no readable images in {kind} source {root}: "
                         f"{len(src.problems)} problem(s){': ' + shown + more if shown else ''}. "
                         f"Check data.root and data.classes.")
    return src


def sort_names(names) -> list[str]:
    """Sort class names: numerically when all are integers ("2" < "10"), else as strings."""
    names = sorted(set(names))
    if names and all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return names


def _check_fixed(kind: str, classes: list[str] | None, fixed: list[str]) -> list[str]:
    if classes is not None and classes != fixed:
        raise CleanError(f"data.classes does not match the {kind} classes {fixed}; "
                         f"set data.classes to null for this source")
    return list(fixed)


def _png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _write_if_changed(path: Path, data: bytes) -> bool:
    """Write `data` atomically unless `path` already holds exactly these bytes."""
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return False
    except OSError:
        pass
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return True


@SOURCES.register("digits", doc="scikit-learn's bundled 8×8 handwritten digits (1,797 images), exported once as PNGs")
def _digits(root, out_dir: Path, classes, progress) -> Source:
    from sklearn.datasets import load_digits

    names = _check_fixed("digits", classes, DIGITS_CLASSES)
    d = load_digits()
    imgs = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # [1797, 8, 8]
    base = Path(os.path.abspath(out_dir)) / "images" / "digits"
    records = []
    tick = Ticker(progress, "export digits", len(imgs))
    for i, (img, t) in enumerate(zip(imgs, d.target)):
        p = base / str(int(t)) / f"{i:04d}.png"
        _write_if_changed(p, _png_bytes(img))
        records.append(Record(str(p), str(int(t)), None, "L", img.shape))
        tick.to(i + 1)
    tick.done()
    return Source("digits", records, [], names)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise CleanError(f"Fashion-MNIST file missing: {root / stem}[.gz]; {_FASHION_FIX}")


@SOURCES.register("fashion-mnist",
                  doc="the four Fashion-MNIST IDX files (official 60k train / 10k test); default root "
                      "/usr/share/datasets/fashion-mnist")
def _fashion(root, out_dir: Path, classes, progress) -> Source:
    names = _check_fixed("fashion-mnist", classes, FASHION_CLASSES)
    root = Path(root) if root is not None else FASHION_ROOT
    if not root.is_dir():
        raise CleanError(f"Fashion-MNIST folder not found: {root}; {_FASHION_FIX}")
    records: list[Record] = []
    for split, (img_stem, lbl_stem) in _FASHION_FILES.items():
        img_file, lbl_file = _find(root, img_stem), _find(root, lbl_stem)
        imgs, labels = read_idx(img_file), read_idx(lbl_file)
        if imgs.ndim != 3 or imgs.dtype != np.uint8:
            raise CleanError(f"{img_file}: not an IDX image file (magic 2051: uint8, N x H x W); "
                             f"found {imgs.dtype} with shape {list(imgs.shape)}. Re-download it.")
        if labels.ndim != 1 or labels.dtype != np.uint8:
            raise CleanError(f"{lbl_file}: not an IDX label file (magic 2049: uint8, N); "
                             f"found {labels.dtype} with shape {list(labels.shape)}. Re-download it.")
        if len(imgs) != len(labels):
            raise CleanError(f"{img_file} holds {len(imgs)} images but {lbl_file} holds "
                             f"{len(labels)} labels; re-download the pair.")
        if len(labels) and int(labels.max()) >= len(names):
            raise CleanError(f"{lbl_file}: label {int(labels.max())} is out of range 0..{len(names) - 1}; "
                             f"re-download it.")
        ref = os.path.abspath(img_file)
        hw = tuple(int(s) for s in imgs.shape[1:])
        records.extend(Record(f"{ref}#{i}", names[y], split, "L", hw)
                       for i, y in enumerate(labels.tolist()))
    return Source("fashion-mnist", records, [], names)


def _probe(path: str) -> tuple[str | None, tuple[int, int] | None, str | None]:
    """One open and one full decode of `path` → (PIL mode, (H, W), None), or (None, None, reason)."""
    try:
        mode, hw = probe_image(path)
        return mode, hw, None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a problem row
        return None, None, describe_failure(path, e)


def _probe_chunk(paths: list[str]) -> list[tuple[str | None, tuple[int, int] | None, str | None]]:
    return [_probe(p) for p in paths]


def _check_files(candidates: list[tuple[str, str, str | None]], progress) -> tuple[list[Record], list[Problem]]:
    """Fully decode each (path, label, split) once; readable ones -> Records, the rest -> Problems."""
    from pipeline.data.pool import map_chunks

    records, problems = [], []
    tick = Ticker(progress, "check images", len(candidates))
    sizes: dict = {}  # one shared (H, W) tuple per distinct size, one string per distinct mode
    probes = map_chunks(_probe_chunk, [c[0] for c in candidates], "images")  # worker processes for large folders
    for k, ((path, label, split), (mode, hw, reason)) in enumerate(zip(candidates, probes)):
        if reason is None:
            hw = sizes.setdefault(hw, hw)
            records.append(Record(path, label, split, sizes.setdefault(mode, mode), hw))
        else:
            problems.append(Problem(path, reason))
        tick.to(k + 1)
    tick.done()
    return records, problems


def _root(root, kind: str, what: str, missing: str | None = None, folder: bool = True) -> Path:
    """data.root as a Path; CleanError when a source that needs it has none, or (with `missing`,
    the message) when it is not an existing folder (`folder`) / file."""
    if root is None:
        raise CleanError(f"data.root is required for data.source = {kind}: set it to {what}")
    path = Path(root)
    if missing is not None and not (path.is_dir() if folder else path.is_file()):
        raise CleanError(missing.format(path=path, what=("is a folder, not a CSV file" if path.is_dir() else "not found")))
    return path


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTS


def _is_utf8(name: str) -> bool:
    """False for a file name that is not valid UTF-8 (Python holds its bytes as surrogates)."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _shown(path: str) -> str:
    """A path that cannot be encoded, with its undecodable bytes written as \\xNN (for problems.csv)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _subdirs(folder: Path) -> tuple[list[Path], list[Path]]:
    """(sorted entries, non-hidden subfolders) of `folder`."""
    entries = sorted(folder.iterdir(), key=lambda p: p.name)
    return entries, [d for d in entries if d.is_dir() and not d.name.startswith(".")]


def _split_folders(root: Path, subdirs: list[Path]) -> dict[str, Path] | None:
    """{split: folder} when `root` holds the user's own splits (a `train/` folder, the others
    among val/valid/validation/test), None for a flat root/<class>/ folder."""
    named = {d: SPLIT_NAMES.get(d.name.lower()) for d in subdirs}
    if not any(s == "train" for s in named.values()):
        return None
    others = [d.name for d, s in named.items() if s is None]
    if others:
        raise CleanError(f"{root} holds split folders ({', '.join(d.name for d, s in named.items() if s)}) and "
                         f"other folders ({', '.join(others[:5])}): move every class folder into "
                         f"train/ (and val/, test/), or rename the split folders for a flat root/<class>/ layout")
    out: dict[str, Path] = {}
    for d, s in named.items():
        if s in out:
            raise CleanError(f"{root}: both {out[s].name}/ and {d.name}/ name the {s} split; keep one of them")
        out[s] = d
    return out


@SOURCES.register("imagefolder", needs=("root",),
                  doc="a folder root/<class>/<image>, or root/{train,val,test}/<class>/<image> with the user's own splits")
def _imagefolder(root, out_dir: Path, classes, progress) -> Source:
    root = _root(root, "imagefolder", "a folder with one subfolder per class",
                 "image folder not found: {path}; set data.root to a folder with one subfolder per class "
                 "(root/<class>/<image>)")
    entries, subdirs = _subdirs(root)
    if not subdirs:
        raise CleanError(f"no class subfolders in {root}; expected root/<class>/<image>")
    splits = _split_folders(root, subdirs)
    if splits is None:
        groups = [(None, entries, subdirs)]
    else:
        groups = [(s, *_subdirs(splits[s])) for s in ("train", "val", "test") if s in splits]
    all_dirs = [d for _, _, dirs in groups for d in dirs]
    if not all_dirs:
        raise CleanError(f"no class subfolders in {root}/train; expected root/train/<class>/<image>")
    names = classes if classes is not None else sort_names(d.name for d in all_dirs if _is_utf8(d.name))
    known = set(names)
    problems: list[Problem] = []
    candidates: list[tuple[str, str, str | None]] = []
    for f in entries:
        if not f.is_dir() and _is_image_name(f.name):
            where = "a class subfolder" if splits is None else "a split's class subfolder (root/train/<class>/)"
            problems.append(Problem(_shown(os.path.abspath(f)), f"image not inside {where}"))
    for split, ents, dirs in groups:
        if split is not None:
            for f in ents:
                if not f.is_dir() and _is_image_name(f.name):
                    problems.append(Problem(_shown(os.path.abspath(f)), "image not inside a class subfolder"))
        candidates += _folder_candidates(dirs, known, split, problems)
    records, bad = _check_files(candidates, progress)
    notes = []
    if splits is not None:
        have = {r.split for r in records}
        if records and "train" not in have:
            raise CleanError(f"{splits['train']} holds no readable image: the training split needs images in "
                             f"{splits['train']}/<class>/ (unreadable files are listed in problems.csv)")
        notes = [f"{splits[s].name}/ holds no readable image: the {s} split is carved from train/ instead"
                 for s in ("val", "test") if s in splits and s not in have]
    return Source("imagefolder", records, problems + bad, names, notes)


def _folder_candidates(subdirs: list[Path], known: set, split: str | None,
                       problems: list[Problem]) -> list[tuple[str, str, str | None]]:
    """(path, class, split) of every image under the class folders `subdirs`; bad names -> problems."""
    candidates = []
    for d in subdirs:
        name = d.name  # one string per class, shared by its rows
        for dirpath, dirnames, filenames in os.walk(d):
            dirnames[:] = sorted(x for x in dirnames if not x.startswith("."))
            for fn in sorted(filenames):
                if not _is_image_name(fn):
                    continue
                p = os.path.abspath(os.path.join(dirpath, fn))
                if not _is_utf8(p):  # a manifest is UTF-8 text: such a name cannot be listed in it
                    what = "class folder" if not _is_utf8(d.name) else "file or folder"
                    problems.append(Problem(_shown(p), f"{what} name is not valid UTF-8 (rename it)"))
                elif name not in known:
                    problems.append(Problem(p, f"unknown label '{name}' (not in data.classes)"))
                else:
                    candidates.append((p, name, split))
    return candidates


@SOURCES.register("csv", needs=("root",),
                  doc="a CSV with columns path,label and an optional split (train|val|test); paths relative to the CSV")
def _csv(root, out_dir: Path, classes, progress) -> Source:
    csv_path = _root(root, "csv", "a CSV file with columns path,label",
                     "CSV file {path} {what}; set data.root to a CSV with columns path,label", folder=False)
    base = os.path.dirname(os.path.abspath(csv_path))
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, row) for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise CleanError(f"cannot parse CSV {csv_path}: {e}; save it as UTF-8 CSV with columns path,label") from None
    if not rows:
        raise CleanError(f"CSV {csv_path} is empty; it needs a header row with columns path,label")
    cols = [c.strip() for c in rows[0][1]]
    missing = [c for c in ("path", "label") if c not in cols]
    if missing:
        raise CleanError(f"CSV {csv_path} lacks column(s) {', '.join(missing)}: found columns "
                         f"{cols}; required columns: path,label")
    pi, li = cols.index("path"), cols.index("label")
    si = cols.index("split") if "split" in cols else None  # optional: the user's own splits
    known = set(classes) if classes is not None else None
    seen: dict[str, int] = {}
    labels_seen: set[str] = set()
    shared: dict[str, str] = {}
    problems: list[Problem] = []
    candidates: list[tuple[str, str, str | None]] = []
    for line, row in rows[1:]:
        if not any(c.strip() for c in row):
            continue
        raw = row[pi].strip() if pi < len(row) else ""
        label = row[li].strip() if li < len(row) else ""
        given = row[si].strip() if si is not None and si < len(row) else ""
        if not raw:
            problems.append(Problem(f"{os.path.abspath(csv_path)}:{line}", "empty path"))
            continue
        p = os.path.abspath(raw if os.path.isabs(raw) else os.path.join(base, raw))
        split = SPLIT_NAMES.get(given.lower()) if given else None  # empty: carved like a CSV without the column
        if given and split is None:
            problems.append(Problem(p, f"unknown split '{given}' (line {line}; the split column takes train, val or "
                                       f"test, or empty to let prepare carve it)"))
            continue
        if not label:
            problems.append(Problem(p, "unknown label (empty)"))
            continue
        if known is not None and label not in known:
            problems.append(Problem(p, f"unknown label '{label}' (not in data.classes)"))
            continue
        labels_seen.add(label)
        label = shared.setdefault(label, label)  # one string per class, shared by its rows
        if p in seen:
            problems.append(Problem(p, f"duplicate path (already listed on line {seen[p]} of {csv_path.name})"))
            continue
        seen[p] = line
        if not os.path.exists(p):
            problems.append(Problem(p, "file not found"))
            continue
        candidates.append((p, label, split))
    records, bad = _check_files(candidates, progress)
    names = classes if classes is not None else sort_names(labels_seen)
    return Source("csv", records, problems + bad, names)
