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
    None paths are skipped. `command` names the command in the message (e.g. "flag")."""
    ins = [(label, Path(p), _real(p)) for label, p in inputs if p is not None]
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


def image_dirs(manifest: str | os.PathLike | None, limit: int = 100_000) -> list[tuple[str, Path]]:
    """The folders holding a manifest's images (an IDX file itself for `file#i` refs), as
    ("the images of <manifest>", folder) pairs for :func:`check_io`; [] when the manifest is
    missing or unreadable (the command then reports that itself)."""
    from pipeline.data.images import split_ref

    if manifest is None:
        return []
    manifest = Path(manifest)
    found: dict[str, None] = {}
    try:
        with open(manifest, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for i, row in enumerate(reader):
                if i >= limit:
                    break
                raw = (row.get("path") or "").strip()
                if not raw:
                    continue
                file, idx = split_ref(raw, manifest.parent)
                full = file if os.path.isabs(file) else os.path.join(manifest.parent, file)
                found[os.path.normpath(full if idx is not None else os.path.dirname(full))] = None
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    label = "{} (a folder of images listed in " + str(manifest).replace("{", "{{").replace("}", "}}") + ")"
    return [(label, Path(d)) for d in found]
