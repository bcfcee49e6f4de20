"""Pixel-level copy detection: transform-invariant candidates, then an aligned verification.

Works on the 16 × 16 luminance thumbnails `clean score` keeps per image (embeddings.npz
`thumb`, pipeline/scores/features.py). Three steps, each vectorised over all rows:

1. **Canonical view.** Each thumbnail is re-sampled so that its intensity centroid sits at the
   centre (cancels shifts and most of a crop's offset): :func:`canonical`.
2. **Candidates.** An 8 × 8 zero-mean unit-norm descriptor of the canonical view is indexed
   for the training rows (faiss, pipeline/rules/knn.py); every row (train, val, test) asks for
   its `k` nearest with its own descriptor and with its mirror image's (horizontal flips).
3. **Verification.** For each candidate pair, the best normalised cross-correlation of pixels
   and Laplacian (fine detail that tells two similar garments apart) over a few views of the
   second image — mirror × rotation ±6° × zoom 1.08 (crops) — gives a distance d = 1 − best.
   A pair is a copy when d is far below what the row sees from its ordinary neighbours:
   d ≤ `ratio` · min(ref_a, ref_b), ref = the row's `REF_RANK`-th smallest verified distance
   (Lowe's ratio test, per row, so it adapts to how alike a class's images are), or d ≤
   `D_EXACT` (a pixel-identical re-encoding). The ratio is the stated cut (flag.copy_ratio).
"""
from __future__ import annotations

import functools

import numpy as np

#: descriptor side (candidate search) and verification views
DESC_SIDE = 8
#: (rotation degrees, zoom) views of the second image of a pair
VIEWS = ((0.0, 1.0), (0.0, 0.92), (0.0, 1.08), (-6.0, 1.0), (6.0, 1.0))
#: thumbnails whose luminance spread (std, in [0, 1]) is below this are flat: no near-copy check
MIN_STD = 0.02
#: the rank of a row's candidate distances used as its reference (0-based: the 5th smallest)
REF_RANK = 4
#: verified distance at or below which a pair is a copy whatever its neighbours (re-encodings)
D_EXACT = 0.002


def _thumbs(thumb: np.ndarray):
    """uint8 [N, S·S] → float32 tensor [N, S, S] in [0, 1]."""
    import torch

    t = torch.as_tensor(np.asarray(thumb), dtype=torch.float32) / 255.0
    s = int(round(t.shape[1] ** 0.5))
    return t.reshape(len(t), s, s)


def _blur(t):
    """3 × 3 binomial blur of [N, S, S] (JPEG noise and resampling differences average out)."""
    import torch
    import torch.nn.functional as F

    k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0
    return F.conv2d(t[:, None], k[None, None], padding=1)[:, 0]


#: verification resolution: thumbnails are 2 × 2-averaged to this side first when larger (speed)
VERIFY_SIDE = 32


def _small(t):
    """Blurred thumbnails at the verification resolution (VERIFY_SIDE)."""
    return _half(t) if t.shape[-1] > VERIFY_SIDE else _blur(t)


def _half(t):
    """[N, S, S] → [N, S/2, S/2] by 2 × 2 averaging (verification resolution)."""
    import torch.nn.functional as F

    return F.avg_pool2d(t[:, None], 2)[:, 0] if t.shape[-1] >= 16 else t


def centroid(t):
    """Intensity centroid (above each image's minimum) of [N, S, S] → (cy, cx) [N] in [−1, 1] grid units."""
    import torch

    n, s = t.shape[0], t.shape[-1]
    w = t - t.reshape(n, -1).amin(1)[:, None, None]
    tot = w.reshape(n, -1).sum(1).clamp_min(1e-6)
    ys = torch.linspace(-1, 1, s)
    return (w.sum(2) * ys).sum(1) / tot, (w.sum(1) * ys).sum(1) / tot


@functools.lru_cache(maxsize=64)
def _view_grid(s: int, angle: float, zoom: float):
    """Sampling grid [S, S, 2] (x, y) of a rotation by `angle` degrees and magnification `zoom` about
    the centre (F.affine_grid's convention, align_corners=False), before the per-image shift."""
    import torch

    c = (2.0 * torch.arange(s, dtype=torch.float32) + 1.0) / s - 1.0
    y, x = torch.meshgrid(c, c, indexing="ij")
    a = np.deg2rad(angle)
    gx = (np.cos(a) * x - np.sin(a) * y) / zoom
    gy = (np.sin(a) * x + np.cos(a) * y) / zoom
    return torch.stack([gx, gy], -1)


def canonical(t, flip=False, angle: float = 0.0, zoom: float = 1.0, mask: bool = False, centre=None):
    """Thumbnails [N, S, S] re-sampled with their intensity centroid at the centre, then rotated by
    `angle` degrees and magnified by `zoom` (mirrored where `flip`: bool or bool tensor [N]) →
    float32 [N, S, S]; with `mask` also the pixels that fall inside the source ([N, S, S] 0/1).
    centre: the (cy, cx) of the (mirrored) images when already known (:func:`centroid`)."""
    import torch
    import torch.nn.functional as F

    if isinstance(flip, bool):
        t = t.flip(-1) if flip else t
    else:
        t = torch.where(flip[:, None, None], t.flip(-1), t)
    s = t.shape[-1]
    cy, cx = centroid(t) if centre is None else centre
    grid = _view_grid(s, float(angle), float(zoom))[None] + torch.stack([cx, cy], -1)[:, None, None, :]
    out = F.grid_sample(t[:, None], grid, padding_mode="zeros" if mask else "border", align_corners=False)[:, 0]
    if not mask:
        return out
    # pixels whose source lies inside the image; the rotation's corners are ignored (separable, cheap)
    lim = 1.0 - 1.0 / s  # sample points at most half a pixel from the border centres stay inside
    c = (2.0 * torch.arange(s, dtype=torch.float32) + 1.0) / s - 1.0
    mx = ((c[None] / zoom + cx[:, None]).abs() <= lim).float()
    my = ((c[None] / zoom + cy[:, None]).abs() <= lim).float()
    return out, my[:, :, None] * mx[:, None, :]


def _unit(x):
    """Rows zero-mean, unit-norm (an all-constant row stays zero): float32 tensor [N, D]."""
    x = x - x.mean(1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-8)


def descriptor(thumb: np.ndarray, flip: bool = False, chunk: int = 8192) -> np.ndarray:
    """The candidate-search descriptor of thumbnails uint8 [N, S·S] → float32 [N, DESC_SIDE²]
    (unit norm; computed in chunks, so memory stays at the uint8 thumbnails)."""
    import torch.nn.functional as F

    out = np.empty((len(thumb), DESC_SIDE * DESC_SIDE), np.float32)
    for s in range(0, len(thumb), chunk):
        c = canonical(_thumbs(thumb[s:s + chunk]), flip)
        out[s:s + chunk] = _unit(F.adaptive_avg_pool2d(c[:, None], DESC_SIDE).reshape(len(c), -1)).numpy()
    return out


def _spread(thumb: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Luminance std of each thumbnail uint8 [N, S·S] → float32 [N] in [0, 1]."""
    return np.concatenate([np.asarray(thumb[s:s + chunk], np.float32).std(1) / 255.0
                           for s in range(0, len(thumb), chunk)]) if len(thumb) else np.zeros(0, np.float32)


def candidates(thumb, train_pos: np.ndarray, k: int, exact_max: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate pairs of the thumbnails uint8 [M, S·S]: each row's k nearest training descriptors,
    plain and mirrored (self excluded) → (a [P], b [P] rows, descriptor distance [P])."""
    from pipeline.rules import knn

    d, dflip = descriptor(thumb), descriptor(thumb, flip=True)
    index, _ = knn.build_index(d[train_pos], exact_max, seed)
    kk = min(int(k) + 1, len(train_pos))
    rows, dist = [], []
    for q in (d, dflip):
        dd, r = knn.search(index, q, kk)
        rows.append(np.where(r >= 0, train_pos[np.clip(r, 0, None)], -1))
        dist.append(dd)
    r, dd = np.concatenate(rows, 1), np.concatenate(dist, 1)
    a = np.repeat(np.arange(len(thumb)), r.shape[1])
    keep = (r.ravel() >= 0) & (r.ravel() != a)
    return a[keep], r.ravel()[keep], dd.ravel()[keep].astype(np.float64)


def _unique_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unordered pairs, each once, as (lo [P], hi [P]) sorted."""
    lo, hi = np.minimum(a, b).astype(np.int64), np.maximum(a, b).astype(np.int64)
    key = np.unique(lo * (np.int64(1) << 32) + hi)
    return key >> 32, key & ((np.int64(1) << 32) - 1)


def _masked_ncc(x, y, m):
    """Normalised cross-correlation of [P, S, S] x and y over the mask m → [P]."""
    x, y, m = x.reshape(len(x), -1), y.reshape(len(y), -1), m.reshape(len(m), -1)
    n = m.sum(1).clamp_min(1.0)
    x0 = (x - ((x * m).sum(1) / n)[:, None]) * m
    y0 = (y - ((y * m).sum(1) / n)[:, None]) * m
    return (x0 * y0).sum(1) / (x0.norm(dim=1) * y0.norm(dim=1)).clamp_min(1e-8)


def verify(thumb: np.ndarray, a: np.ndarray, b: np.ndarray, flip: np.ndarray | None = None,
           chunk: int = 4096) -> np.ndarray:
    """Aligned distance of each pair (rows a, b of thumb uint8 [M, S·S]): 1 − the best
    normalised cross-correlation of the blurred canonical views, over the pixels both views
    cover, across rotation × zoom views of b (VIEWS; mirrored where `flip` [P] bool, else both)
    → float64 [P] in [0, 2] (0 = identical after alignment)."""
    import torch

    out = np.empty(len(a), np.float64)
    flips = [None] if flip is not None else [False, True]
    rows = np.unique(np.r_[a, b])
    # the candidate rows, blurred, kept in float16 (2 bytes a pixel) and widened chunk by chunk
    blurred = torch.empty((len(rows),) + _small(_thumbs(thumb[:1])).shape[1:], dtype=torch.float16)
    for s in range(0, len(rows), chunk):
        blurred[s:s + chunk] = _small(_thumbs(thumb[rows[s:s + chunk]])).half()
    ia, ib = np.searchsorted(rows, a), np.searchsorted(rows, b)
    for s in range(0, len(a), chunk):
        ta, tb = blurred[ia[s:s + chunk]].float(), blurred[ib[s:s + chunk]].float()
        va, ma = canonical(ta, mask=True)
        best = torch.full((len(ta),), -1.0)
        for fl in flips:
            f = torch.as_tensor(flip[s:s + chunk]) if fl is None else torch.full((len(tb),), fl)
            tbf = torch.where(f[:, None, None], tb.flip(-1), tb)
            centre = centroid(tbf)
            for ang, zoom in VIEWS:
                vb, mb = canonical(tbf, False, ang, zoom, mask=True, centre=centre)
                best = torch.maximum(best, _masked_ncc(va, vb, ma * mb))
        out[s:s + chunk] = (1.0 - best.double()).clamp_min(0.0).numpy()
    return out


def _rank_in_row(rows: np.ndarray, key: np.ndarray) -> np.ndarray:
    """The rank (0 = smallest key) of each entry among the entries of its row → int [P]."""
    o = np.lexsort((key, rows))
    r = rows[o]
    start = np.r_[0, np.flatnonzero(r[1:] != r[:-1]) + 1]
    rank = np.arange(len(r)) - np.repeat(start, np.diff(np.r_[start, len(r)]))
    out = np.empty(len(r), np.int64)
    out[o] = rank
    return out


def copy_pairs(thumb: np.ndarray, train_pos: np.ndarray, ratio: float, k: int = 5, top: int = 2, extra=None,
               exact_max: int = 20_000, seed: int = 0) -> dict:
    """Verified copy pairs among the rows of `thumb` (uint8 [M, S·S]), each with a training row.

    Candidates: :func:`candidates` plus `extra` (a, b) pairs (the embedding k-NN), flat
    thumbnails (std < MIN_STD: blank images, identical to each other by nature) left out. Each row's
    `top` nearest candidates by descriptor, and its REF_RANK-th (its reference: an ordinary
    neighbour), are verified (:func:`verify`). A pair is a copy when its aligned distance
    d ≤ `ratio` · min(ref_a, ref_b) (ref = the row's reference pair's aligned distance; rows
    without one use the other row's) or d ≤ D_EXACT. Returns {"a", "b" [P] rows (a < b), "d" [P],
    "ref" [P], "flip" [P] bool (b mirrored), "n_candidates", "n_verified"}.
    """
    pos = np.asarray(train_pos, np.int64)
    a, b, _ = candidates(thumb, pos, k, exact_max, seed)
    if extra is not None:
        a, b = np.r_[a, extra[0]], np.r_[b, extra[1]]
    a, b = _unique_pairs(a, b)
    textured = _spread(thumb) >= MIN_STD
    a, b = a[textured[a] & textured[b]], b[textured[a] & textured[b]]
    d0, d0f = descriptor(thumb), descriptor(thumb, flip=True)
    plain, mirr = (d0[a] * d0[b]).sum(1), (d0[a] * d0f[b]).sum(1)
    flip, dd = mirr > plain, 1.0 - np.maximum(plain, mirr)
    # per row (both ends): rank of each pair by descriptor distance
    rows, key = np.r_[a, b], np.r_[dd, dd]
    rank = _rank_in_row(rows, key)
    ra, rb = rank[:len(a)], rank[len(a):]
    sel = (ra < top) | (rb < top) | (ra == REF_RANK) | (rb == REF_RANK)
    a, b, flip, ra, rb = a[sel], b[sel], flip[sel], ra[sel], rb[sel]
    d = verify(thumb, a, b, flip)
    ref = np.full(len(thumb), np.nan)
    ref[a[ra == REF_RANK]] = d[ra == REF_RANK]
    ref[b[rb == REF_RANK]] = d[rb == REF_RANK]
    r = np.fmin(ref[a], ref[b])
    with np.errstate(invalid="ignore"):
        ok = ((d <= ratio * r) | (d <= D_EXACT)) & ((ra < top) | (rb < top))
    return {"a": a[ok], "b": b[ok], "d": d[ok], "ref": r[ok], "flip": flip[ok],
            "n_candidates": int(sel.size), "n_verified": int(len(a))}
