"""A split of a manifest decoded into memory (uint8 tensors) for the stages to train/score on.

The manifest itself is read by pipeline/formats/manifest.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.images import load_images
from pipeline.errors import CleanError
from pipeline.formats.manifest import SPLITS, classes_path_for, read_classes, read_manifest


@dataclass
class Split:
    """One split held in memory: ids [N] int64, images uint8 [N, C, H, W], labels [N] int64."""

    ids: np.ndarray
    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def image_size_of(size) -> tuple[int, int] | None:
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def load_split(manifest: str | Path, split: str, image_size=None, in_chans: int | None = None,
               df=None, classes: list[str] | None = None) -> Split:
    """Decode every image of `split` once into memory → :class:`Split` (uint8, [N,C,H,W]).

    `in_chans` defaults to the dataset's (classes.json `in_chans`), so every split of a
    dataset with mixed grayscale/color files decodes to the same channel count.
    """

    manifest = Path(manifest)
    if df is None:
        df = read_manifest(manifest, classes)
    if split not in SPLITS:
        raise CleanError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if in_chans is None and classes_path_for(manifest).is_file():
        ch = read_classes(classes_path_for(manifest)).get("in_chans")
        in_chans = ch if ch in (1, 3) and not isinstance(ch, bool) else None
    part = df[df["split"] == split]
    if len(part) == 0:
        raise CleanError(f"{manifest}: the '{split}' split is empty; check data.val_frac/test_frac or the manifest")
    imgs = load_images(part["path"].tolist(), manifest.parent, size=image_size_of(image_size), in_chans=in_chans)
    return Split(part["id"].to_numpy(np.int64), imgs, part["label"].to_numpy(np.int64))


