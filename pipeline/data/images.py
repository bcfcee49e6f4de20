"""Decode images into uint8 arrays: regular files via PIL, IDX containers via numpy.

A path of the form ``<idx-images-file>#<index>`` refers to one image inside an IDX file
(Fashion-MNIST); every other path is an image file PIL can open.
"""
from __future__ import annotations

import gzip
import math
import os
import stat
import struct
import threading
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import CleanError

#: PIL modes treated as one-channel (grayscale) images.
GRAY_MODES = frozenset({"1", "L", "LA", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_CACHE: OrderedDict = OrderedDict()
_IDX_CACHE_MAX = 4
_IDX_LOCK = threading.Lock()
#: decoded images up to this many bytes (64 × 64 RGB) are decoded by worker processes (pipeline/data/pool.py)
PARALLEL_MAX_BYTES = 64 * 64 * 3
_FIX = "run `clean prepare`, which lists unreadable files in data/problems.csv, and fix or remove them"


def channels_of(mode: str) -> int:
    """1 for a grayscale PIL mode (L, 1, I, I;16, F, LA), else 3."""
    return 1 if mode in GRAY_MODES else 3


def split_ref(path: str, base: str | os.PathLike | None = None) -> tuple[str, int | None]:
    """Split ``'<idx file>#12'`` into ``('<idx file>', 12)``; any other path gives ``(path, None)``.

    A path that names an existing file is that file, so an image whose name holds ``#`` and
    digits (``scan#12``) is never taken for image 12 of a file ``scan``. `base`: the folder a
    relative path is read from (default: the working directory)."""
    head, sep, tail = str(path).rpartition("#")
    if sep and head and tail.isdigit() and tail.isascii():
        full = str(path) if base is None or os.path.isabs(str(path)) else os.path.join(base, str(path))
        if not os.path.isfile(full):
            return head, int(tail)
    return str(path), None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a whole IDX file (gzip or raw) into a read-only array of its stored shape.

    E.g. Fashion-MNIST images -> uint8 [N, 28, 28], labels -> uint8 [N]. Results are cached
    per (path, mtime, size), so repeated calls are free. Malformed file -> CleanError.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        raise CleanError(f"IDX file not found: {p}") from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block or never end
        raise CleanError(f"IDX file {p} is not a regular file (a pipe or a device); give the IDX file itself")
    key = (os.path.abspath(p), st.st_mtime_ns, st.st_size)
    with _IDX_LOCK:
        if key in _IDX_CACHE:
            _IDX_CACHE.move_to_end(key)
            return _IDX_CACHE[key]
    arr = _parse_idx(p)
    with _IDX_LOCK:
        _IDX_CACHE[key] = arr
        while len(_IDX_CACHE) > _IDX_CACHE_MAX:
            _IDX_CACHE.popitem(last=False)
    return arr


def _parse_idx(p: Path) -> np.ndarray:
    fix = "the file is corrupt or not an IDX file; re-download or reinstall it"
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise CleanError(f"cannot read IDX file {p}: {e.strerror or e}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise CleanError(f"{p}: broken gzip data ({e}); {fix}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise CleanError(f"{p}: bad IDX magic number {magic!r} (expected e.g. 2051 for images, "
                         f"2049 for labels); {fix}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CleanError(f"{p}: IDX header is cut short; {fix}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = math.prod(dims)
    if len(raw) - header != count * dtype.itemsize:
        raise CleanError(f"{p}: IDX header declares shape {list(dims)} ({count * dtype.itemsize} bytes) "
                         f"but the file holds {len(raw) - header} data bytes; {fix}")
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    if dtype.byteorder == ">":
        arr = arr.astype(dtype.newbyteorder("="))
    arr.flags.writeable = False
    return arr


class NotRegularFile(OSError):
    """An image path that is a FIFO, a device or a socket: never opened (a read could block forever)."""


def open_image(path: str | os.PathLike) -> Image.Image:
    """PIL.Image.open, for regular files only (checked before opening: a FIFO would hang the read)."""
    if not stat.S_ISREG(os.stat(path).st_mode) and not os.path.isdir(path):
        raise NotRegularFile(f"{path} is not a regular file")
    return Image.open(path)


def probe_image(path: str | os.PathLike) -> tuple[str, tuple[int, int]]:
    """Open and fully decode one image file; return (PIL mode, (H, W)).

    Raises the underlying exception (OSError, UnidentifiedImageError, ...) on failure;
    see :func:`describe_failure` for a human reason.
    """
    with open_image(path) as im:
        im.load()
        return im.mode, (im.height, im.width)


def probe_size(file: str, shown: str) -> tuple[int, int]:
    """(H, W) of one stored image, reading only its header (an IDX reference: the file's H, W)."""
    _, idx = split_ref(shown)
    if idx is not None and str(file).endswith(f"#{idx}"):
        idx = None  # `file` is the image itself, a file whose name ends in #<digits>
    try:
        if idx is not None:
            return tuple(int(d) for d in _idx_images(file, shown).shape[1:3])
        with open_image(file) as im:
            return im.height, im.width
    except CleanError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure names the file
        raise CleanError(f"cannot read image {shown}: {describe_failure(file, e)}; {_FIX}") from None


def describe_failure(path: str | os.PathLike, exc: BaseException) -> str:
    """A short human reason for why `path` could not be decoded (for problems.csv)."""
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, NotRegularFile):
        return "not a regular file (a pipe, a device or a socket)"
    if isinstance(exc, IsADirectoryError):
        return "not a file (a directory)"
    if isinstance(exc, PermissionError):
        return "cannot open file (permission denied)"
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
    except OSError:
        pass
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (unrecognised format)"
    msg = str(exc).strip() or type(exc).__name__
    if "truncated" in msg.lower():
        return f"truncated image ({msg})"
    return f"corrupt image ({msg})"


def _to_pil(im: Image.Image, chans: int) -> Image.Image:
    """Convert a decoded PIL image to mode L (chans=1) or RGB (chans=3), 8-bit."""
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im).astype(np.float64)
        if im.mode.startswith("I;16") or (im.mode == "I" and a.size and a.max() > 255):
            a = a * (255.0 / 65535.0)
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("L" if chans == 1 else "RGB")


def _decode(path: str, shown: str, chans: int, hw: tuple[int, int]) -> np.ndarray:
    try:
        with open_image(path) as im:
            im.load()
            im = _to_pil(im, chans)
    except Exception as e:  # noqa: BLE001 - any decoder failure is a user-data problem
        raise CleanError(f"cannot read image {shown}: {describe_failure(path, e)}; {_FIX}") from None
    if (im.height, im.width) != tuple(hw):
        im = im.resize((hw[1], hw[0]), Image.BILINEAR)
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _resize_stack(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear-resize a uint8 stack [K, h, w] to [K, H, W]."""
    out = np.empty((len(x), hw[0], hw[1]), dtype=np.uint8)
    for i, img in enumerate(x):
        out[i] = np.asarray(Image.fromarray(img).resize((hw[1], hw[0]), Image.BILINEAR))
    return out


def _idx_images(file: str, shown: str) -> np.ndarray:
    arr = read_idx(file)
    if arr.ndim != 3 or arr.dtype != np.uint8:
        raise CleanError(f"{shown}: expected an IDX image file (uint8, N x H x W), found "
                         f"{arr.dtype} with shape {list(arr.shape)}")
    return arr


def load_images(paths: list[str], base_dir: Path, size: tuple[int, int] | None = None,
                in_chans: int | None = None) -> np.ndarray:
    """Decode `paths` into one uint8 array of shape [N, C, H, W] (values 0..255).

    Relative paths resolve against `base_dir` (the manifest's folder). ``file#i`` refers to
    image i of an IDX file (each file read once, sliced vectorised). `size` = (H, W) to
    resize to (bilinear) and `in_chans` = 1 (L) or 3 (RGB); both default to the first
    image's. An unreadable file -> CleanError naming it.
    """
    base = Path(base_dir)
    n = len(paths)
    if in_chans is not None and in_chans not in (1, 3):
        raise CleanError(f"in_chans must be 1 or 3, got {in_chans!r}")
    refs = []
    for p in paths:
        file, idx = split_ref(str(p), base)
        full = file if os.path.isabs(file) else os.path.join(base, file)
        refs.append((full, idx, str(p)))
    if n == 0:
        h, w = size if size is not None else (0, 0)
        return np.zeros((0, in_chans or 1, h, w), dtype=np.uint8)

    chans, hw = in_chans, tuple(size) if size is not None else None
    if chans is None or hw is None:
        full, idx, shown = refs[0]
        if idx is not None:
            first_c, first_hw = 1, _idx_images(full, shown).shape[1:]
        else:
            try:
                mode, first_hw = probe_image(full)
            except Exception as e:  # noqa: BLE001
                raise CleanError(f"cannot read image {shown}: {describe_failure(full, e)}; {_FIX}") from None
            first_c = channels_of(mode)
        chans = chans or first_c
        hw = hw or tuple(first_hw)

    out = np.empty((n, chans, hw[0], hw[1]), dtype=np.uint8)
    groups: dict[str, tuple[list[int], list[int]]] = {}
    files: list[int] = []
    for i, (full, idx, _) in enumerate(refs):
        if idx is None:
            files.append(i)
        else:
            groups.setdefault(full, ([], []))[0].append(i)
            groups[full][1].append(idx)

    for full, (pos, idxs) in groups.items():
        arr = _idx_images(full, full)
        idxs_a = np.asarray(idxs, dtype=np.int64)
        bad = idxs_a >= len(arr)
        if bad.any():
            j = pos[int(np.argmax(bad))]
            raise CleanError(f"image {refs[j][2]} does not exist: {full} holds {len(arr)} images; {_FIX}")
        sub = arr[idxs_a]
        if sub.shape[1:] != hw:
            sub = _resize_stack(sub, hw)
        out[np.asarray(pos)] = sub[:, None, :, :]  # broadcasts over C (gray -> RGB repeats)

    if files:
        from functools import partial

        from pipeline.data.pool import map_chunks

        # worker processes for many small images; one process for large ones, whose pixels cost more to send
        # back than to decode (2,000 JPEGs at 224 px: 0.81 s here, 1.75 s through 2 workers, 1.57 s in threads)
        work = partial(_decode_chunk, chans=chans, hw=tuple(hw))
        small = chans * hw[0] * hw[1] <= PARALLEL_MAX_BYTES
        for i, a in zip(files, map_chunks(work, [(refs[i][0], refs[i][2]) for i in files], "images", small)):
            out[i] = a
    return out


def _decode_chunk(items: list[tuple[str, str]], chans: int, hw: tuple[int, int]) -> list[np.ndarray]:
    """_decode of each (file, shown name) → uint8 [C, H, W] arrays (one worker task)."""
    return [_decode(f, shown, chans, hw) for f, shown in items]
