"""Images for train/score: decoded once into memory, or streamed from disk in batches.

A split whose decoded size N·C·H·W bytes exceeds `data.cache_max_gb` is not decoded up
front: `open_split` returns a :class:`~pipeline.data.dataset.Split` whose `images` is a
:class:`StreamImages`, an array-like that decodes `images[index]` on demand with the same
code as the in-memory path (`load_images`, same size/channels), and `iter_batches` decodes
batches ahead in DataLoader worker processes. Same order, same pixels, same normalisation,
hence the same results as the in-memory path.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.dataset import Split, image_size_of, load_split
from pipeline.data.images import load_images
from pipeline.errors import CleanError
from pipeline.formats.manifest import classes_path_for, read_classes, read_manifest

GB = 2**30


class StreamImages:
    """uint8 images [N, C, H, W] decoded from their files on demand (read-only, array-like).

    `images[key]` (an int, slice or index array) decodes those images → np.ndarray uint8.
    `workers` = DataLoader worker processes used by :func:`iter_batches` (0 = decode inline).
    """

    ndim = 4
    dtype = np.dtype(np.uint8)

    def __init__(self, paths, base_dir, chw: tuple[int, int, int], workers: int = 0):
        self.paths = np.asarray(list(paths), dtype=object)
        self.base_dir = Path(base_dir)
        self.chw = tuple(int(v) for v in chw)
        self.workers = int(workers)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), *self.chw)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key) -> np.ndarray:
        scalar = isinstance(key, (int, np.integer))
        paths = [self.paths[key]] if scalar else list(self.paths[key])
        c, h, w = self.chw
        out = load_images(paths, self.base_dir, size=(h, w), in_chans=c)
        return out[0] if scalar else out

    def subset(self, start: int, stop: int) -> "StreamImages":
        """Images start..stop-1 (a contiguous shard), streamed the same way."""
        return StreamImages(self.paths[start:stop], self.base_dir, self.chw, self.workers)


class _Failed:
    """What a decode worker returns instead of raising: the CleanError's message (a worker's
    exception would reach the main process wrapped in a traceback text)."""

    def __init__(self, message: str):
        self.message = message


class _Decode:
    """Map-style dataset for DataLoader: a key (slice or index array) → uint8 array batch."""

    def __init__(self, images: StreamImages):
        self.images = images

    def __getitem__(self, key):
        try:
            return self.images[key]
        except CleanError as e:
            return _Failed(str(e))

    def __len__(self) -> int:
        return len(self.images)


def iter_batches(images, keys: list, pin: bool = False):
    """Yield `images[k]` for each key in `keys`, in order (np.ndarray or torch uint8 tensors).

    In-memory arrays are sliced directly. Streamed images are decoded ahead by
    `images.workers` DataLoader worker processes (pinned memory when `pin`, for
    non-blocking copies to the GPU); with 0 workers they are decoded inline.
    """
    if not isinstance(images, StreamImages) or images.workers <= 0 or len(keys) <= 1:
        for k in keys:
            yield images[k]
        return
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(_Decode(images), sampler=keys, batch_size=None, num_workers=min(images.workers, len(keys)),
                        pin_memory=pin, prefetch_factor=2,
                        generator=torch.Generator())  # own generator: never draws from the global RNG
    for xb in loader:
        if isinstance(xb, _Failed):
            raise CleanError(xb.message)
        yield xb


def check_readable(images, progress=None, chunk: int = 1024) -> None:
    """Decode every streamed image once (with the decode workers) so that an unreadable one is
    named before training starts, not when it is first needed; in-memory images are already
    decoded."""
    if not isinstance(images, StreamImages):
        return
    if progress:
        progress("log", message=f"checking {len(images):,} streamed validation images")
    n = len(images)
    for _ in iter_batches(images, [slice(a, min(n, a + chunk)) for a in range(0, n, chunk)]):
        pass


def decoded_bytes(n: int, chw) -> int:
    """Bytes of n decoded uint8 images of shape chw = (C, H, W)."""
    c, h, w = chw
    return int(n) * int(c) * int(h) * int(w)


def open_split(manifest: str | Path, split: str, image_size=None, in_chans: int | None = None, df=None,
               cache_max_gb: float = 4.0, workers: int = 4, rows=None):
    """A split as a :class:`Split`: decoded into memory when N·C·H·W ≤ `cache_max_gb` GiB
    (exactly `load_split`), else with `images` = :class:`StreamImages` (decoded on demand).

    `rows` (a manifest DataFrame slice) replaces the split selection (e.g. split 'all').
    """

    manifest = Path(manifest)
    if df is None and rows is None:
        df = read_manifest(manifest)
    if in_chans is None and classes_path_for(manifest).is_file():  # the dataset's channels, as load_split
        ch = read_classes(classes_path_for(manifest)).get("in_chans")
        in_chans = ch if ch in (1, 3) and not isinstance(ch, bool) else None
    part = rows if rows is not None else df[df["split"] == split]
    if len(part) == 0:
        raise CleanError(f"{manifest}: the '{split}' split is empty; check data.val_frac/test_frac or the manifest")
    size = image_size_of(image_size)
    paths = part["path"].tolist()
    first = load_images(paths[:1], manifest.parent, size=size, in_chans=in_chans)
    chw = first.shape[1:]
    if decoded_bytes(len(part), chw) <= cache_max_gb * GB:
        if rows is None:
            return load_split(manifest, split, image_size, in_chans, df=df)
        return Split(part["id"].to_numpy(np.int64), load_images(paths, manifest.parent, chw[1:], chw[0]),
                     part["label"].to_numpy(np.int64))
    return Split(part["id"].to_numpy(np.int64), StreamImages(paths, manifest.parent, chw, workers),
                 part["label"].to_numpy(np.int64))


def is_streamed(images) -> bool:
    return isinstance(images, StreamImages)

