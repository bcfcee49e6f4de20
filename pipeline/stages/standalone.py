"""Standalone inputs for `clean score PATH` outside DVC: a manifest, an ImageFolder or a CSV."""
from __future__ import annotations

import csv
from pathlib import Path

from pipeline.config import PrepareConfig
from pipeline.formats.manifest import REQUIRED, classes_path_for, read_manifest
from pipeline.errors import CleanError


def _header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except (UnicodeDecodeError, csv.Error) as e:
        raise CleanError(f"cannot parse CSV {path}: {e}; save it as UTF-8 CSV (a manifest, or columns path,label)") from None
    return header


def is_manifest(path: Path) -> bool:
    """True when `path` is a CSV whose header holds the manifest columns id,path,label,split.

    A CSV with a manifest-only column (id or split) next to a classes.json is meant to be a
    manifest: read_manifest's error then names the missing columns.
    """
    if path.suffix.lower() != ".csv" or not path.is_file():
        return False
    header = _header(path)
    if all(c in header for c in REQUIRED):
        return True
    if {"id", "split"} & set(header) and classes_path_for(path).is_file():
        read_manifest(path)  # raises: missing column(s) ...
    return False


def as_manifest(path: str | Path, work_dir: str | Path, classes: list[str] | None = None) -> tuple[Path, dict]:
    """Return a manifest for `path`: itself when it is one, else a new one for the folder/CSV.

    A folder (root/<class>/<image>) or a `path,label` CSV becomes `work_dir/manifest.csv`
    (+ classes.json, problems.csv) with every image in the `train` split. `classes` (a
    model's classes) fixes the label order; other labels are listed in problems.csv.
    Returns (manifest path, prepare summary or {}).
    """
    from pipeline.stages.prepare import prepare

    path = Path(path)
    if not path.exists():
        raise CleanError(f"{path}: no such file or folder; give an image folder (root/<class>/<image>), "
                         "a CSV of path,label, or a manifest")
    if is_manifest(path):
        return path, {}
    kind = "imagefolder" if path.is_dir() else "csv"
    work_dir = Path(work_dir)
    summary = prepare(work_dir, PrepareConfig(source=kind, root=str(path), val_frac=0.0, test_frac=0.0, seed=0,
                                              classes=classes))
    return work_dir / "manifest.csv", summary
