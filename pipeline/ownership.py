"""Folders that `clean` owns as a whole (model folders): the marker, the lock, the atomic swap.

A model folder is replaced as a whole, so `clean` must never replace one it did not make:

- **marker**: every model folder holds `.clean-model` (written with the model). `claim`
  accepts a folder that does not exist, is empty, holds the marker, or holds only the files
  an older `clean train` wrote (no marker yet); anything else is refused, so a command never
  removes or overwrites a file it did not create.
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
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from pipeline.errors import CleanError

MARKER = ".clean-model"
#: what the marker holds (constant: a model folder's bytes depend only on the model)
MARKER_TEXT = json.dumps({"written_by": "clean train", "format": 1}) + "\n"
#: what an older `clean train` (before the marker) put in a model folder
_LEGACY_FILES = {"model.safetensors", "config.json", "metrics.json", "dynamics.npz"}
_LEGACY_DIRS = {"checkpoints", "seeds", ".partial"}


def staging_path(folder: Path) -> Path:
    """Where the new version of `folder` is assembled, beside it (same filesystem)."""
    return folder.parent / f".{folder.name}.clean-new"


def aside_path(folder: Path) -> Path:
    """Where the old version waits during a two-rename swap (no RENAME_EXCHANGE)."""
    return folder.parent / f".{folder.name}.clean-old"


def lock_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.lock"


def is_marked(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def mark(folder: Path) -> None:
    """Write the marker into `folder` (atomically)."""
    from pipeline.io import write_text

    write_text(Path(folder) / MARKER, MARKER_TEXT)


def _legacy_model_folder(folder: Path) -> bool:
    """True when every entry of `folder` is one an older `clean train` wrote (config.json by clean)."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not (isinstance(cfg, dict) and "recipe" in cfg and "classes" in cfg):
        return False
    for p in folder.iterdir():
        if p.name in _LEGACY_FILES and p.is_file():
            continue
        if p.name == "checkpoints" and p.is_dir() and all(
                c.is_file() and c.name.startswith("epoch_") and c.suffix == ".safetensors" for c in p.iterdir()):
            continue
        if p.name == "seeds" and p.is_dir() and all(
                s.is_dir() and s.name.startswith("seed_") and all(f.name in _LEGACY_FILES | {"resume"} for f in s.iterdir())
                for s in p.iterdir()):
            continue
        if p.name == ".partial" and p.is_dir():
            continue
        return False
    return True


def claim(folder: Path, option: str = "--out", command: str = "clean train") -> None:
    """Make `folder` a model folder `command` may replace: create it (with the marker) when
    missing or empty; accept it when marked or written by an older `clean train`; else CleanError."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CleanError(f"{option} {folder} is a file; give a folder for the model (e.g. models/base)")
    if folder.is_dir() and not is_marked(folder):
        entries = sorted(p.name for p in folder.iterdir())
        if entries and not _legacy_model_folder(folder):
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise CleanError(f"{option} {folder} is not empty and was not written by `clean train` (no {MARKER}; it "
                             f"holds {shown}); `{command}` replaces its folder as a whole, so give a new or empty "
                             "folder (e.g. models/base)")
    folder.mkdir(parents=True, exist_ok=True)
    if not is_marked(folder):
        mark(folder)


@contextlib.contextmanager
def locked(folder: Path, option: str = "--out") -> Iterator[None]:
    """Hold an exclusive lock on `folder` (`.<name>.lock` beside it); CleanError at once when
    another process holds it."""
    import fcntl

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
    import ctypes
    import sys

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
    new, aside = staging_path(folder), aside_path(folder)
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
