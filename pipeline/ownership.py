"""Folders that `clean` owns as a whole (model folders): the marker, the lock, the atomic swap.

A model folder is replaced as a whole, so `clean` must never replace one it did not make:

- **marker**: every model folder holds `.clean-model` (written with the model). `claim`
  accepts a folder that does not exist or is empty, or one that is `clean`'s (the marker, or
  an older `clean train`'s config.json) and holds only files `clean train` writes; anything
  else is refused, so a swap never removes or overwrites a file `clean` did not create.
- **lock**: `locked` takes an exclusive lock on `.<name>.lock` beside the folder (flock; the
  file is removed on release), so two runs on one folder cannot interleave: the second one
  is refused at once with a message naming the folder.
- **swap**: `swap_in(new, folder)` puts a complete new folder in place of the old one with
  one atomic `renameat2(RENAME_EXCHANGE)` (Linux), after which the old one (now at `new`'s
  path) is removed. Where the exchange is not available, two renames via `.<name>.clean-old`
  are used, and `recover` (called under the lock before every run) puts back whichever
  complete folder a kill between them left aside. Readers therefore always find the
  complete old or the complete new folder.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Iterator

from pipeline.errors import CleanError
from pipeline.io import write_text

MARKER = ".clean-model"
#: what the marker holds (constant: a model folder's bytes depend only on the model)
MARKER_TEXT = json.dumps({"written_by": "clean train", "format": 1}) + "\n"
#: the files `clean train` writes into a model folder (and into each seeds/seed_<s>/)
_MODEL_FILES = {"model.safetensors", "config.json", "metrics.json", "dynamics.npz", "probs.npz", MARKER}
_TMP = re.compile(r"\.(.+)\.[A-Za-z0-9_]+\.tmp")  # pipeline/io.atomic_path's temp files, left by a kill -9


def staging_path(folder: Path) -> Path:
    """Where the new version of `folder` waits to be swapped in, beside it (same filesystem)."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.clean-new"


def aside_path(folder: Path) -> Path:
    """Where the old version waits during a two-rename swap (no RENAME_EXCHANGE)."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.clean-old"


def lock_path(folder: Path) -> Path:
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


def is_marked(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def mark(folder: Path) -> None:
    """Write the marker into `folder` (atomically)."""

    write_text(Path(folder) / MARKER, MARKER_TEXT)


def _ours(name: str, allowed: set[str]) -> bool:
    m = _TMP.fullmatch(name)
    return name in allowed or (m is not None and m.group(1) in allowed)


def foreign_entries(folder: Path) -> list[str]:
    """The entries of a model folder that `clean train` would not have written (relative paths)."""
    folder = Path(folder)
    bad = []
    for p in sorted(folder.iterdir(), key=lambda q: q.name):
        if p.is_file() and _ours(p.name, _MODEL_FILES):
            continue
        if p.name == ".partial" and p.is_dir():
            continue  # the work folder of a run in this folder
        if p.name == "checkpoints" and p.is_dir():
            bad += [f"checkpoints/{c.name}" for c in sorted(p.iterdir())
                    if not (c.is_file() and re.fullmatch(r"\.?epoch_\d+\.safetensors(\.[A-Za-z0-9_]+\.tmp)?", c.name))]
            continue
        if p.name == "seeds" and p.is_dir():
            for run in sorted(p.iterdir()):
                if not (run.is_dir() and re.fullmatch(r"seed_\d+", run.name)):
                    bad.append(f"seeds/{run.name}")
                    continue
                bad += [f"seeds/{run.name}/{f.name}" for f in sorted(run.iterdir())
                        if not ((f.is_file() and _ours(f.name, _MODEL_FILES)) or (f.name == "resume" and f.is_dir()))]
            continue
        bad.append(p.name + ("/" if p.is_dir() else ""))
    return bad


def _made_by_clean(folder: Path) -> bool:
    """Marked, or a model folder of an older `clean train` (its config.json has a recipe)."""
    if is_marked(folder):
        return True
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "recipe" in cfg and "classes" in cfg


def not_a_link(folder: Path, option: str = "--out", command: str = "clean train") -> None:
    """CleanError when `folder` itself is a symbolic link: a model folder is replaced by renaming
    a new folder onto its path, which would replace the link, not the folder it points to."""
    folder = Path(folder)
    if folder.is_symlink():
        target = os.readlink(folder)
        raise CleanError(f"{option} {folder} is a symbolic link (to {target}); `{command}` replaces its model folder "
                         f"as a whole by renaming, so give the folder itself (--out {os.path.relpath(os.path.realpath(folder))}) "
                         "or a new folder")


def claim(folder: Path, option: str = "--out", command: str = "clean train") -> None:
    """Make `folder` a model folder `command` may replace as a whole: create it (with the
    marker) when missing, take it when empty; when it holds files, every one must be a file
    `clean train` writes and the folder must be `clean`'s (marked, or made by an older
    version); else CleanError naming what is in the way."""
    folder = Path(folder)
    not_a_link(folder, option, command)
    if folder.exists() and not folder.is_dir():
        raise CleanError(f"{option} {folder} is a file; give a folder for the model (e.g. models/base)")
    if folder.is_dir() and any(folder.iterdir()):
        bad = foreign_entries(folder)
        if bad or not _made_by_clean(folder):
            shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "") if bad else \
                ", ".join(sorted(p.name for p in folder.iterdir())[:3])
            raise CleanError(f"{option} {folder} holds files that `clean train` did not write ({shown}); "
                             f"`{command}` replaces its model folder as a whole, so give a new or empty folder "
                             "(e.g. models/base), or move those files away")
    folder.mkdir(parents=True, exist_ok=True)
    if not is_marked(folder):
        mark(folder)


@contextlib.contextmanager
def locked(folder: Path, option: str = "--out") -> Iterator[None]:
    """Hold an exclusive lock on `folder` (`.<name>.lock` beside it); CleanError at once when
    another process holds it."""

    folder = Path(folder)
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                pid = path.read_text().strip()
            except OSError:
                pid = ""
            who = f" (process {pid})" if pid.isdigit() else ""
            raise CleanError(f"{option} {folder} is in use by another `clean` run{who}; wait for it to finish "
                             "or write to another folder") from None
        try:  # the file may have been removed by its last holder between open and lock: retry
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE) → False where unsupported."""

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a))


def swap_in(new: Path, folder: Path) -> None:
    """Replace `folder` by the complete folder `new` (same filesystem) in one step; the old
    version is removed afterwards. `folder` may be missing."""
    new, folder = Path(new), Path(folder)
    if not folder.exists():
        os.rename(new, folder)
        return
    if _exchange(new, folder):
        shutil.rmtree(new)  # now the old version
        return
    aside = aside_path(folder)
    os.rename(folder, aside)
    os.rename(new, folder)
    shutil.rmtree(aside)


def recover(folder: Path, work: str | None = None) -> None:
    """Finish or undo what a killed `swap_in` left beside `folder` (call with the lock held).

    With the two-rename swap `folder` may be missing: the complete staged folder is moved
    in, else the old one is put back. A staged folder that was built from `folder/<work>`
    (still there, so the swap never happened) is swapped in. Then leftovers of ours (marked)
    are removed; a folder by those names that is not ours is reported, never removed.
    """
    folder = Path(folder)
    not_a_link(folder)
    new, aside = staging_path(folder), aside_path(folder)
    for p in (new, aside):
        if p.is_symlink():  # an older `clean` swapped a linked model folder: the user's link ended up here
            p.unlink()  # a link only: the folder it points to is kept
    if not folder.exists():
        if new.is_dir() and is_marked(new):
            os.rename(new, folder)
        elif aside.is_dir() and is_marked(aside):
            os.rename(aside, folder)
    elif (work and new.is_dir() and is_marked(new) and not (new / work).exists()
          and (folder / work).is_dir()):
        swap_in(new, folder)
    for p in (new, aside):
        if p.is_dir():
            if not is_marked(p) and any(p.iterdir()):
                raise CleanError(f"{p} is in the way of {folder} and was not written by `clean` (no {MARKER}); "
                                 "move it elsewhere")
            shutil.rmtree(p)
