"""Shared fixtures: tiny generated images and IDX files."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _save_image(path, hw=(8, 8), mode="L", seed=0, fmt=None) -> Path:
    """Write a small random image (PIL `mode`, size (H, W)) to `path`; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = hw if mode == "L" else (*hw, 3)
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(path, format=fmt)
    return path


def _write_idx(path, arr: np.ndarray, gz: bool = True) -> Path:
    """Write uint8 `arr` as an IDX file (magic 0x08, ndim), gzip-compressed when `gz`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    data = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


@pytest.fixture
def save_image():
    """save_image(path, hw=(8, 8), mode="L", seed=0, fmt=None) -> Path."""
    return _save_image


@pytest.fixture
def write_idx():
    """write_idx(path, uint8 array, gz=True) -> Path."""
    return _write_idx


@pytest.fixture
def fashion_dir(tmp_path, write_idx):
    """A tiny Fashion-MNIST layout: 12 train + 5 test 4x4 images, labels 0..9 cycling."""
    root = tmp_path / "fm"
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 4, 4)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test (restored after): tiny models on a busy 2-core
    machine run much faster and steadier than with threads contending for the cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
