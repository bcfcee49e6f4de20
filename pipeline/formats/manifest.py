"""manifest.csv and classes.json: the one reader and writer of each.

A manifest is a CSV `id,path,label,split[,orig_label,noisy]`; paths are relative to the
manifest's folder (posix, `../` allowed) for every file inside the repository that holds it, so a
clone at another path reads them; files outside it are absolute; `<file>#<index>` names one
image of an IDX file. A dataset version is a list of ids.
classes.json (beside the manifest) holds the class names in label order.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from pipeline.errors import CleanError
from pipeline.io import atomic_path, settled, write_frame

REQUIRED = ["id", "path", "label", "split"]
SPLITS = ["train", "val", "test"]


def read_manifest(path: str | Path, classes: list[str] | None = None):
    """Read and validate a manifest CSV → pandas DataFrame (id:int, label:int, ...).

    Checks: file exists, required columns, unique integer ids, integer labels inside
    [0, len(classes)), known split names. Raises CleanError naming the problem.
    """
    import pandas as pd

    path = settled(path)  # a commit of several files that a kill interrupted is finished first
    if not path.exists():
        raise CleanError(f"manifest not found: {path}; create it with `clean prepare`")
    try:
        df = pd.read_csv(path, dtype={"path": str, "split": str}, keep_default_na=False)
    except Exception as e:  # noqa: BLE001
        raise CleanError(f"{path}: not a readable CSV ({type(e).__name__}: {e})") from None
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise CleanError(f"{path}: missing column(s) {', '.join(missing)}; a manifest needs "
                         f"{','.join(REQUIRED)} (found: {','.join(map(str, df.columns))})")
    if len(df) == 0:
        raise CleanError(f"{path}: the manifest has no rows; run `clean prepare` on a source with images")
    for col in ["id", "label"] + [c for c in ("orig_label", "noisy") if c in df.columns]:
        integer_column(df, col, path)
    empty = df["path"].str.strip() == ""
    if empty.any():
        row = int(np.flatnonzero(empty.to_numpy())[0])
        raise CleanError(f"{path}: row {row + 2} (id {int(df['id'].iloc[row])}) has an empty path; "
                         "every row needs the image file it describes (re-run `clean prepare`)")
    dup = df["id"].duplicated()
    if dup.any():
        raise CleanError(f"{path}: duplicate id {int(df['id'][dup].iloc[0])} "
                         f"({int(dup.sum())} duplicates); ids must be unique")
    bad_split = ~df["split"].isin(SPLITS)
    if bad_split.any():
        raise CleanError(f"{path}: unknown split {df['split'][bad_split].iloc[0]!r}; use one of {', '.join(SPLITS)}")
    if classes is not None:
        c = len(classes)
        for col in ["label"] + (["orig_label"] if "orig_label" in df.columns else []):
            out = (df[col] < 0) | (df[col] >= c)
            if out.any():
                raise CleanError(f"{path}: {col} {int(df[col][out].iloc[0])} (id {int(df['id'][out].iloc[0])}) "
                                 f"is outside the {c} classes of classes.json (0..{c - 1})")
    return df


def integer_column(df, col: str, path, fix: str = "") -> None:
    """Convert df[col] to int64 in place; CleanError naming the first non-integer row (+ `fix`)."""
    import pandas as pd

    vals = pd.to_numeric(df[col], errors="coerce")
    bad = vals.isna() | ~np.isfinite(vals) | (vals != vals.round()) | (vals.abs() > 2 ** 53)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raw = df[col].iloc[row]
        raise CleanError(f"{path}: column '{col}' must hold integers; row {row + 2} has "
                         f"{raw.item() if hasattr(raw, 'item') else raw!r}" + (f"; {fix}" if fix else ""))
    df[col] = vals.astype(np.int64)


def read_classes(path: str | Path) -> dict:
    """Read `classes.json` → dict with at least `classes` (list of names)."""
    from pipeline.formats.jsonfile import read_json

    path = Path(path)
    info = read_json(path, "not found; it is written by `clean prepare` next to the manifest", "re-run `clean prepare`")
    if isinstance(info, list):
        info = {"classes": info}
    if not isinstance(info, dict) or not isinstance(info.get("classes"), list):
        raise CleanError(f"{path}: expected {{\"classes\": [names...]}}; re-run `clean prepare`")
    names = info["classes"]
    if not names:
        raise CleanError(f"{path}: the class list is empty; a classifier needs at least one class "
                         "(re-run `clean prepare` on a source with images)")
    bad = [c for c in names if not isinstance(c, str) or not c]
    if bad:
        raise CleanError(f"{path}: class names must be non-empty strings, got {bad[0]!r}; re-run `clean prepare`")
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise CleanError(f"{path}: class {dup[0]!r} is listed more than once; class names must be distinct")
    return info


#: what marks the root of the repository a manifest belongs to (its paths are relative inside it)
REPO_MARKERS = ("dvc.yaml", ".dvc", ".git")


def repository_root(out_dir: str | Path) -> Path | None:
    """The nearest folder at or above `out_dir` holding dvc.yaml, .dvc or .git (absolute), else None."""

    here = Path(os.path.abspath(out_dir))
    for d in (here, *here.parents):
        if any(os.path.lexists(d / m) for m in REPO_MARKERS):
            return d
    return None


def relative_ref(file: str, out_dir: str | Path, root: str | Path | None) -> str:
    """`file` as a manifest in `out_dir` lists it: relative to `out_dir` (posix, `../` allowed)
    when it lies under `root` (under `out_dir` when `root` is None), else absolute."""

    a = os.path.abspath(file)
    out = os.path.abspath(out_dir).rstrip("/") + "/"
    inside = out if root is None else os.path.abspath(root).rstrip("/") + "/"
    if not a.startswith(inside):  # string tests: pathlib's relative_to costs 24 s per million paths
        return a
    return a[len(out):] if a.startswith(out) else os.path.relpath(a, out)


def classes_path_for(manifest: str | Path) -> Path:
    """classes.json lives next to the manifest it describes (data/classes.json)."""
    return Path(manifest).parent / "classes.json"


def rebase_paths(df, src_dir: str | Path, dst_dir: str | Path):
    """Rewrite relative `path`s of a manifest read from src_dir so they resolve from dst_dir.

    Absolute paths and `<idx file>#<index>` suffixes are kept; returns a new DataFrame.
    """

    src, dst = Path(src_dir).resolve(), Path(dst_dir).resolve()
    if src == dst:
        return df

    def one(p: str) -> str:
        if os.path.isabs(p):
            return p
        return os.path.relpath(src / p, dst)

    out = df.copy()
    out["path"] = [one(p) for p in df["path"]]
    return out


def write_manifest(df, path: str | Path, src_manifest: str | Path) -> None:
    """Write a manifest derived from `src_manifest` (paths rebased; classes.json copied beside it)."""

    path, src_manifest = Path(path), Path(src_manifest)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_frame(path, rebase_paths(df, src_manifest.parent, path.parent))
    src_classes, dst_classes = classes_path_for(src_manifest), path.parent / "classes.json"
    if src_classes.resolve() != dst_classes.resolve():
        with atomic_path(dst_classes) as tmp:
            shutil.copyfile(src_classes, tmp)
