"""Atomic file output: every file a stage writes goes through a temp file + rename.

An interrupted stage therefore leaves the previous version of each output intact.

`together(folder)` makes several outputs of one folder change as one: inside it, each
`atomic_path` write into that folder is kept as a finished temp file; on a clean exit a
journal naming every temp → target pair (`.clean-commit.json`) is written atomically (the
commit point) and then the temps are renamed into place. A process killed before the journal
exists leaves every old file; killed after, the next reader of that folder (`settle`, called
by every reader in pipeline/formats and by every writer here) completes the renames first.
So the files of a stage are always all old or all new, as seen by any command.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterator


_UMASK = os.umask(0)
os.umask(_UMASK)
#: the permissions of every output file (what open() would give it)
FILE_MODE = 0o666 & ~_UMASK
#: a folder's pending multi-file commit (see `together`)
JOURNAL = ".clean-commit.json"

_groups = threading.local()


def _active() -> list:
    if not hasattr(_groups, "stack"):
        _groups.stack = []
    return _groups.stack


def settle(folder: str | os.PathLike) -> None:
    """Finish an interrupted `together` commit in `folder`, if its journal is there (idempotent)."""
    folder = Path(folder)
    journal = folder / JOURNAL
    try:
        pairs = json.loads(journal.read_text(encoding="utf-8"))["replace"]
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError):
        journal.unlink(missing_ok=True)  # a journal is written atomically: unreadable means foreign/damaged
        return
    try:
        for tmp, target in pairs:
            if os.path.basename(tmp) != tmp or os.path.basename(target) != target:
                continue  # a journal names files of its own folder only
            with contextlib.suppress(FileNotFoundError):
                os.replace(folder / tmp, folder / target)
        journal.unlink(missing_ok=True)
    except OSError as e:
        from pipeline.errors import CleanError

        raise CleanError(f"{journal}: an interrupted write of several files cannot be finished "
                         f"({e.strerror or e}); make {folder} writable and run the command again") from None


def settled(path: str | os.PathLike) -> Path:
    """`path`, after finishing any interrupted commit of its folder (readers call this)."""
    path = Path(path)
    settle(path.parent)
    return path


@contextlib.contextmanager
def together(folder: str | os.PathLike) -> Iterator[None]:
    """Every `atomic_path` write into `folder` (its direct children) inside this block takes
    effect at once, when the block ends without an exception; else none does."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settle(folder)
    group = {"folder": os.path.abspath(folder), "pairs": []}
    _active().append(group)
    try:
        yield
    except BaseException:
        _active().remove(group)
        for tmp, _ in group["pairs"]:
            with contextlib.suppress(FileNotFoundError):
                (folder / tmp).unlink()
        raise
    _active().remove(group)
    pairs = group["pairs"]
    if not pairs:
        return
    write_text(folder / JOURNAL, json.dumps({"replace": pairs}, indent=1) + "\n")  # the commit point
    settle(folder)  # the renames (a reader that finishes them at the same time is no harm)


def _group_for(path: Path):
    parent = os.path.abspath(path.parent)
    for g in reversed(_active()):
        if g["folder"] == parent:
            return g
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success it replaces `path` atomically.

    On any exception the temp file is removed and `path` is left untouched. The result has
    the usual permissions (`FILE_MODE`), whatever the writer did to the temp file. Inside
    `together(path.parent)` the rename waits for the end of that block.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    group = _group_for(path)
    if group is None:
        settle(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        _name(e, path)
        raise
    os.close(fd)
    os.chmod(tmp, FILE_MODE)  # mkstemp makes 0600; give outputs the usual permissions
    tmp = Path(tmp)
    try:
        yield tmp
        if os.stat(tmp).st_mode & 0o777 != FILE_MODE:  # a writer that re-created the file (safetensors: 0600)
            os.chmod(tmp, FILE_MODE)
        if group is None:
            os.replace(tmp, path)
        else:
            for old in [p for p in group["pairs"] if p[1] == path.name]:  # written twice: the last one wins
                group["pairs"].remove(old)
                with contextlib.suppress(FileNotFoundError):
                    (path.parent / old[0]).unlink()
            group["pairs"].append([tmp.name, path.name])
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(e, OSError):
            _name(e, path)
        raise


def _name(e: OSError, path: Path) -> None:
    """A failed write() or mkstemp names no file (or a temp one): name the output it was for."""
    if e.filename is None or os.path.basename(str(e.filename)).startswith(f".{path.name}."):
        e.filename = str(path)


#: OS errors that are the user's to fix (their disk, their permissions), not a bug of `clean`
USER_ERRNOS = {errno.ENOSPC: "no space left on the disk", errno.EDQUOT: "the disk quota is used up",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted", errno.EFBIG: "the file is too large for the file system"}


def describe_os_error(e: OSError, path: "str | os.PathLike | None" = None) -> str:
    """One line for an OS error the user can fix: what failed, on which path, the free space
    there (for a full disk) and the fix. `path`: the file meant when the error names none."""
    where = e.filename if e.filename is not None else path
    what = USER_ERRNOS.get(e.errno, e.strerror or str(e))
    line = f"{where}: {what}" if where is not None else what
    if e.errno in (errno.ENOSPC, errno.EDQUOT) and where is not None:
        free = _free_bytes(where)
        if free is not None:
            line += f" ({free / 2 ** 20:,.1f} MiB free there)"
        return line + "; free some space (or write the output to another disk), then run the command again"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return line + "; make it writable (or give an output path you can write), then run the command again"
    return line + "; fix that, then run the command again"


def _free_bytes(path) -> int | None:
    p = Path(path)
    for q in (p, *p.parents):
        try:
            return shutil.disk_usage(q).free
        except OSError:
            continue
    return None


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented, key-sorted JSON atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_csv(path: str | os.PathLike, header: list[str], rows) -> None:
    """Write a CSV (header + rows of sequences) atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(header)
            w.writerows(rows)


def write_frame(path: str | os.PathLike, df) -> None:
    """Write a pandas DataFrame as CSV (no index) atomically, floats with full precision."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, lineterminator="\n")
