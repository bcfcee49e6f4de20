"""Per-image features for the embedding- and image-based detectors (docs/methods.md §2.2).

One eval-mode forward pass over every split of the manifest gives, per image:
- the penultimate embedding h (the classifier head's input; float16 [M, D]);
- a 64-bit hash of the decoded pixels (exact duplicates);
- image statistics for the image-property checks, computed from the same decoded batch:
  brightness percentiles, variance of the Laplacian (blur), Laplacian-to-gradient energy
  (sharpness), pixel entropy (information), colour spread (grayscale in a colour set); plus
  each file's native height and width;
- a 32 × 32 luminance thumbnail (uint8) for the pixel-level copy check (rules/copies.py).
Written by `clean score` to scores/embeddings.npz and read by `clean flag`. Batched numpy /
torch math; no loop over samples except hashing each image's bytes.
"""
from __future__ import annotations

import hashlib
import os
from functools import partial
from pathlib import Path

import numpy as np

from pipeline.data.images import probe_size, split_ref
from pipeline.data.pool import map_chunks
from pipeline.data.stream import iter_batches
from pipeline.training.infer import batches, normalize

#: the arrays of embeddings.npz besides ids / split / emb / hash
STAT_KEYS = ("brightness_p05", "brightness_p99", "blur", "sharpness", "entropy", "colour_spread", "height", "width")
#: side of the luminance thumbnail kept per image (copy verification)
THUMB = 32


def pixel_hash(batch_u8: np.ndarray) -> np.ndarray:
    """64-bit BLAKE2b hash of each image's decoded pixels (shape included): uint8 [B,C,H,W] → uint64 [B]."""
    b = np.ascontiguousarray(batch_u8)
    head = np.asarray(b.shape[1:], np.int64).tobytes()
    return np.array([int.from_bytes(hashlib.blake2b(head + img.tobytes(), digest_size=8).digest(), "little")
                     for img in b], dtype=np.uint64)


def image_stats(batch_u8: np.ndarray) -> dict[str, np.ndarray]:
    """Image statistics of uint8 [B,C,H,W] → {name: float32 [B]} (cleanvision's definitions).

    brightness = perceived luminance in [0, 1] (0.299 R + 0.587 G + 0.114 B for colour);
    brightness_p05 / _p99: its 5th / 99th percentile per image; blur: variance of the
    4-neighbour Laplacian of the luminance (in [0,1] units; low = blurry); sharpness:
    Σ Laplacian² / Σ |central-difference gradient|² — the high-frequency share of the edge
    energy, independent of how much of the image is edge (a thin stroke is as sharp as a
    thick one; a blurred edge loses Laplacian energy faster than gradient energy; 0 when
    the image has no gradient); entropy: Shannon
    entropy (bits, 0..8) of the 256-bin luminance histogram (low = little information);
    colour_spread: mean over pixels of max − min over the colour channels, in [0, 1]
    (0 for a grayscale image, and for 1-channel sets).
    """
    x = np.asarray(batch_u8, np.float32) / 255.0
    b, c, h, w = x.shape
    lum = x[:, 0] if c == 1 else 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    flat = lum.reshape(b, -1)
    p05, p99 = np.percentile(flat, [5, 99], axis=1)
    if h >= 3 and w >= 3:
        lap = (lum[:, 1:-1, :-2] + lum[:, 1:-1, 2:] + lum[:, :-2, 1:-1] + lum[:, 2:, 1:-1]
               - 4.0 * lum[:, 1:-1, 1:-1])
        blur = lap.reshape(b, -1).var(axis=1)
        gx = 0.5 * (lum[:, 1:-1, 2:] - lum[:, 1:-1, :-2])
        gy = 0.5 * (lum[:, 2:, 1:-1] - lum[:, :-2, 1:-1])
        g2 = (gx * gx + gy * gy).reshape(b, -1).sum(axis=1)
        sharp = np.divide((lap * lap).reshape(b, -1).sum(axis=1), g2, out=np.zeros(b, np.float32), where=g2 > 0)
    else:
        blur = sharp = np.zeros(b, np.float32)
    q = np.clip(np.rint(flat * 255.0), 0, 255).astype(np.int64)
    counts = np.zeros((b, 256), np.float64)
    np.add.at(counts, (np.repeat(np.arange(b), q.shape[1]), q.ravel()), 1.0)
    p = counts / q.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -(np.where(p > 0, p * np.log2(p), 0.0)).sum(axis=1)
    spread = (x.max(axis=1) - x.min(axis=1)).reshape(b, -1).mean(axis=1) if c > 1 else np.zeros(b, np.float32)
    return {"brightness_p05": p05.astype(np.float32), "brightness_p99": p99.astype(np.float32),
            "blur": blur.astype(np.float32), "sharpness": sharp.astype(np.float32), "entropy": ent.astype(np.float32),
            "colour_spread": np.asarray(spread, np.float32)}


def thumbnails(batch_u8: np.ndarray, side: int = THUMB) -> np.ndarray:
    """Luminance thumbnails of uint8 [B,C,H,W] → uint8 [B, side·side] (antialiased bilinear resize)."""
    import torch

    x = torch.as_tensor(np.asarray(batch_u8), dtype=torch.float32)
    lum = x[:, :1] if x.shape[1] == 1 else (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    t = torch.nn.functional.interpolate(lum, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return t.round().clamp(0, 255).to(torch.uint8).reshape(len(x), -1).numpy()


def native_sizes(paths: list[str], base_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(height [M], width [M]) of each file as stored (header read only; IDX images: the file's H, W)."""

    hw = list(map_chunks(partial(_sizes_chunk, base_dir=str(base_dir)), [str(p) for p in paths], "image headers"))
    arr = np.asarray(hw, np.int64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def _sizes_chunk(paths: list[str], base_dir: str) -> list[tuple[int, int]]:
    """(H, W) as stored of each manifest path (one worker task of :func:`native_sizes`)."""

    out = []
    for p in paths:
        file, _ = split_ref(p, base_dir)
        out.append(probe_size(file if os.path.isabs(file) else os.path.join(base_dir, file), p))
    return out


def batch_features(xb_u8: np.ndarray, h) -> dict[str, np.ndarray]:
    """Features of one decoded batch: uint8 [B,C,H,W] and its head inputs h (tensor [B, D, ...])
    → {emb float16 [B, D], hash uint64 [B], thumb uint8 [B, THUMB²], <STAT_KEYS minus height/width> float32 [B]}."""
    xb = np.asarray(xb_u8)
    out = {"emb": _embedding(h, len(xb)), "hash": pixel_hash(xb),
           "thumb": thumbnails(xb)}
    out.update(image_stats(xb))
    return out


#: the keys :func:`batch_features` returns
FEATURE_KEYS = ("emb", "hash", "thumb") + tuple(k for k in STAT_KEYS if k not in ("height", "width"))


def _head_inputs(model, images_u8, mean, std, batch_size: int, device: str, progress=None):
    """Yield (uint8 batch [B,C,H,W], head input h [B, D, ...]) over images_u8 (array or streamed) in eval mode,
    advancing `progress` per batch: the one forward loop of :func:`image_features` and :func:`embed`."""
    import torch

    from pipeline.head import forward_logits_features

    model.eval()
    spans = list(batches(len(images_u8), batch_size))
    with torch.inference_mode():
        for (s, e), xb in zip(spans, iter_batches(images_u8, [slice(s, e) for s, e in spans],
                                                  pin=str(device).startswith("cuda"))):
            xb = np.asarray(xb)
            _, h = forward_logits_features(model, normalize(xb, mean, std, device))
            yield xb, h
            if progress:
                progress("advance", n=e - s)


def image_features(model, images_u8, mean, std, batch_size: int, device: str, progress=None) -> dict:
    """Embeddings, pixel hashes and image statistics of uint8 images [M,C,H,W] (array or streamed).

    Returns {emb float16 [M, D], hash uint64 [M], thumb uint8 [M, THUMB²], <STAT_KEYS minus height/width> float32 [M]}.
    The embedding is the input of the classifier head in eval mode (pipeline/head.py).
    """
    out: dict[str, list] = {k: [] for k in FEATURE_KEYS}
    for xb, h in _head_inputs(model, images_u8, mean, std, batch_size, device, progress):
        for k, v in batch_features(xb, h).items():
            out[k].append(v)
    if not out["emb"]:
        return empty_features()
    return {k: np.concatenate(v) for k, v in out.items()}


def embed(model, images_u8, mean, std, batch_size: int, device: str, progress=None) -> np.ndarray:
    """The penultimate embedding (the classifier head's input, eval mode) of uint8 images [M,C,H,W]
    (array or streamed) → float16 [M, D]: :func:`image_features`' `emb` alone (no hash, thumbnail or stats)."""
    out = [_embedding(h, len(xb)) for xb, h in _head_inputs(model, images_u8, mean, std, batch_size, device, progress)]
    return np.concatenate(out) if out else np.empty((0, 0), np.float16)


def _embedding(h, n: int) -> np.ndarray:
    """Head inputs h (tensor [n, D, ...]) → float16 [n, D·…] on the CPU (what embeddings.npz stores)."""
    return h.detach().float().reshape(n, -1).cpu().numpy().astype(np.float16)


def empty_features(n: int = 0, dim: int = 0) -> dict[str, np.ndarray]:
    """Uninitialised feature arrays for n images with embedding size dim (keys :data:`FEATURE_KEYS`)."""
    return {"emb": np.empty((n, dim), np.float16), "hash": np.empty(n, np.uint64),
            "thumb": np.empty((n, THUMB * THUMB), np.uint8), **{k: np.empty(n, np.float32) for k in FEATURE_KEYS[3:]}}
