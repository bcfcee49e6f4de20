"""Where a command may write: never onto or into what it reads.

Every command calls :func:`check_io` with the paths it reads (files and folders: the manifest,
score files, a model folder, the folders holding the source images, ...) and the paths it
will write, before it writes anything. An output that is one of the inputs, or lies inside
an input folder, is refused with one line naming both and the fix. Paths are compared after
resolving symlinks (and hard links of existing files), so `./data/../data/manifest.csv` is
`data/manifest.csv`. :func:`check_name` keeps a name given on the command line (which becomes
part of a file name) inside its folder.
"""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Iterable

from pipeline.data.images import split_ref
from pipeline.errors import CleanError

Labelled = Iterable[tuple[str, "str | os.PathLike | None"]]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _real(p) -> Path:
    return Path(os.path.realpath(os.path.abspath(p)))


def _same(a: Path, b: Path, ra: Path, rb: Path) -> bool:
    if ra == rb:
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def check_io(command: str, inputs: Labelled = (), outputs: Labelled = ()) -> None:
    """CleanError when an output path equals an input path or lies inside an input folder.

    `inputs` / `outputs`: (label, path) pairs, e.g. ("--manifest", "data/manifest.csv");
    None paths are skipped. `command` names the command in the message (e.g. "flag").
    An input that is a table of image paths (a manifest, a CSV source) brings the folders of its images as inputs too (:func:`image_dirs`),
    so no output lands among the source images whichever command writes it."""
    ins = [(label, Path(p), _real(p)) for label, p in _with_images(inputs)]
    for out_label, out in outputs:
        if out is None:
            continue
        out = Path(out)
        ro = _real(out)
        for in_label, inp, ri in ins:
            what = in_label.format(_shown(inp)) if "{}" in in_label else f"{in_label} {inp}"
            if _same(out, inp, ro, ri):
                raise CleanError(f"{out_label} {out} is {what}, an input of `clean {command}`: an output "
                                 f"never replaces an input; give {out_label} another path")
            if ri in ro.parents:
                raise CleanError(f"{out_label} {out} lies inside {what}, an input of `clean {command}`: "
                                 f"outputs never go into an input folder; give {out_label} a path outside it")


def _with_images(inputs: Labelled) -> list[tuple[str, "str | os.PathLike"]]:
    """`inputs` (None paths dropped), each table of image paths followed by its image folders."""
    out, seen = [], set()
    for label, p in inputs:
        if p is None:
            continue
        out.append((label, p))
        key = _real(p)
        if key not in seen and _is_image_table(p):
            seen.add(key)
            out.extend(image_dirs(p))
    return out


def _is_image_table(p) -> bool:
    """A manifest (id,path,label,split) or a CSV source (path,label[,split]): a regular file whose
    header names them. scores.csv (id,path,label,..., its paths relative to the manifest) is not."""
    try:
        if not os.path.isfile(p):  # never open a FIFO or a device (it could block)
            return False
        with open(p, newline="", encoding="utf-8-sig") as f:
            head = next(csv.reader([f.readline(65536)]), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return "path" in head and "label" in head and ("split" in head or "id" not in head)  # not scores.csv


def project_sources(params: "str | os.PathLike | None", manifest: "str | os.PathLike | None") -> list:
    """The project's source-image tree as check_io inputs: params' data.root (when set) and the
    folders of the images the project's manifest lists (the manifest itself is an output of
    `clean prepare`, so it is no input here). A params file that does not
    load adds nothing here (the command reports it when it reads its params)."""
    found = []
    if params is not None and os.path.isfile(params):
        from pipeline.params import load_params

        try:
            root = load_params(params)["data"]["root"]
        except CleanError:
            root = None
        if root:
            found.append(("data.root", root))
    return found + image_dirs(manifest)


def _shown(p: Path) -> str:
    """`p` relative to the working directory when it lies below it."""
    try:
        return os.path.relpath(p) if _real(os.getcwd()) in _real(p).parents else str(p)
    except ValueError:
        return str(p)


def check_name(option: str, value: str, becomes: str) -> str:
    """`value` if it is a plain name (letters, digits, '.', '_', '-'; no path), else CleanError.
    `becomes`: what it names, e.g. "metrics/<name>.json"."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value in (".", ".."):
        raise CleanError(f"{option} {value!r} must be a plain name (letters, digits, '.', '_', '-'; at most 100), "
                         f"not a path: it becomes {becomes}")
    return value


def image_dirs(manifest: str | os.PathLike | None, limit: int = 5_000_000) -> list[tuple[str, Path]]:
    """The folders holding a manifest's images (an IDX file itself for `file#i` refs), as
    ("the images of <manifest>", folder) pairs for :func:`check_io`; [] when the manifest is
    missing or unreadable (the command then reports that itself)."""

    if manifest is None:
        return []
    manifest = Path(manifest)
    raws: dict[str, None] = {}  # the distinct folders (or IDX refs) as written: a million rows, a few folders
    try:
        if not os.path.isfile(manifest):  # never open a FIFO or a device (it could block)
            return []
        with open(manifest, newline="", encoding="utf-8-sig") as f:
            for i, row in enumerate(csv.DictReader(f)):
                if i >= limit:
                    break
                raw = row.get("path")
                raw = raw.strip() if isinstance(raw, str) else ""
                if raw:
                    raws[raw.rpartition("/")[0] if "#" not in raw else raw] = None
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    found: dict[str, None] = {}
    for raw in raws:
        file, idx = split_ref(raw, manifest.parent) if "#" in raw else (raw, None)
        full = file if os.path.isabs(file) else os.path.join(manifest.parent, file)
        folder = full if idx is not None or "#" not in raw else os.path.dirname(full)
        found[os.path.normpath(folder)] = None
    label = "{} (a folder of images listed in " + str(manifest).replace("{", "{{").replace("}", "}}") + ")"
    return [(label, Path(d)) for d in found]
