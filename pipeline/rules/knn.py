"""Cosine k-nearest neighbours through faiss, shared by the duplicate and outlier detectors.

Embeddings are L2-normalised, so inner product = cosine similarity and cosine distance =
1 − inner product. Up to :data:`EXACT_MAX` indexed vectors the search is exact (IndexFlatIP);
beyond, an approximate IVF index (inverted lists over k-means cells, ``nprobe`` of them
visited per query) — measured in bench/planted.py: flat search costs O(N²·D) and passes
~10 s at 60k × 128-d on one core, IVF stays near-linear (1M × 128-d in a few minutes).
Never an N × N matrix: memory is the index (N·D float32) plus the [Q, k] answers.
"""
from __future__ import annotations

import math
import time

import numpy as np

#: indexed vectors up to which the search is exact (IndexFlatIP); above it IVF (approximate)
EXACT_MAX = 20_000
#: IVF: inverted lists visited per query. 70k Fashion-MNIST embeddings (54k indexed, nlist 464, one thread):
#: nprobe 12 → 8 cuts the search 4.0 → 2.3 s at recall@11 0.996 → 0.991 against the exact search; the flags
#: barely move (outlier 481 → 492 flagged, 478 shared; duplicate 353 → 355, all 353 kept; leakage the same)
NPROBE = 8


def normalize(x) -> np.ndarray:
    """float32 [N, D] copy of `x` with unit-norm rows (an all-zero row stays zero)."""
    v = np.array(x, dtype=np.float32, copy=True, order="C")
    if v.ndim != 2:
        v = v.reshape(len(v), -1)
    n = np.linalg.norm(v, axis=1, keepdims=True)
    np.divide(v, n, out=v, where=n > 0)
    return v


def build_index(base: np.ndarray, exact_max: int = EXACT_MAX, seed: int = 0):
    """A faiss inner-product index over the unit-norm rows `base` [N, D] → (index, kind)."""
    import faiss

    n, d = base.shape
    if n <= exact_max:
        index = faiss.IndexFlatIP(d)
        index.add(base)
        return index, "flat (exact)"
    nlist = int(min(65536, max(64, 2 * math.sqrt(n))))
    quant = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    train = base[np.sort(rng.choice(n, size=min(n, 40 * nlist), replace=False))]
    index.cp.seed = seed
    index.train(train)
    index.add(base)
    index.nprobe = NPROBE
    return index, f"ivf (approximate, nlist={nlist}, nprobe={NPROBE})"


def search(index, query: np.ndarray, k: int, batch: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """k nearest rows of `index` for each unit-norm query row → (cosine distance [Q, k] float32, row [Q, k] int64).

    Missing neighbours (an index smaller than k, or an IVF probe that found fewer) are row −1,
    distance +inf. Batched so that faiss's per-query buffers stay small.
    """
    k = int(k)
    q = len(query)
    dist = np.empty((q, k), np.float32)
    rows = np.empty((q, k), np.int64)
    for s in range(0, q, batch):
        sim, idx = index.search(query[s:s + batch], k)
        dist[s:s + batch] = 1.0 - sim
        rows[s:s + batch] = idx
    missing = rows < 0
    dist[missing] = np.inf
    np.maximum(dist, 0.0, out=dist, where=~missing)  # rounding can give 1 − sim slightly below 0
    return dist, rows


def drop_self(dist: np.ndarray, rows: np.ndarray, self_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own row from its k+1 answers → [Q, k] (the last column when it is absent,
    e.g. when k+1 exact copies tie with it)."""
    q, k1 = rows.shape
    is_self = rows == self_rows[:, None]
    first = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k1 - 1)
    keep = np.ones((q, k1), bool)
    keep[np.arange(q), first] = False
    return dist[keep].reshape(q, k1 - 1), rows[keep].reshape(q, k1 - 1)


def train_knn(feats: dict, k: int, exact_max: int = EXACT_MAX, seed: int = 0, emb_key: str = "emb",
              cache: bool = True, queries: np.ndarray | None = None) -> dict:
    """The k nearest *training* embeddings of every row of embeddings.npz (cached in `feats` with `cache`).

    feats: from :func:`pipeline.rules.base.load_features` (emb [M, D], train_pos [N]); emb_key: which
    embedding array ("emb": the scored model's; "emb_1", …: the other seed models', :func:`embedding_keys`);
    queries: bool [M], the rows to answer (default all; the others get row −1, distance +inf; never cached).
    Returns {"dist" [M, k], "rows" [M, k] (rows of embeddings.npz), "kind", "seconds"}: a training
    row's answers exclude itself; a val/test row searches the training index as it is.
    """

    key = ("_knn", int(k), int(exact_max), int(seed), str(emb_key))
    store = feats.setdefault("_cache", {}) if queries is None else {}
    if key in store:
        return store[key]
    # a cached answer for a larger k serves a smaller one
    for other, val in store.items():
        if other[0] == "_knn" and other[1] >= k and other[2:] == key[2:]:
            return {**val, "dist": val["dist"][:, :k], "rows": val["rows"][:, :k]}
    t0 = time.perf_counter()
    emb = normalize(embedding(feats, emb_key))
    pos = np.asarray(feats["train_pos"], np.int64)
    m = len(emb)
    base = emb[pos]
    index, kind = build_index(base, exact_max, seed)
    kk = min(int(k) + 1, len(pos))
    dist = np.full((m, k), np.inf, np.float32)
    rows = np.full((m, k), -1, np.int64)
    asked = np.ones(m, bool) if queries is None else np.asarray(queries, bool)
    if kk >= 1 and len(pos) and asked.any():
        at = np.flatnonzero(asked)
        d, r = search(index, emb if queries is None else emb[at], kk)
        r = np.where(r >= 0, pos[np.clip(r, 0, None)], -1)  # index row → embeddings.npz row
        is_train = np.zeros(m, bool)
        is_train[pos] = True
        tr = is_train[at]
        # training rows: drop themselves; others: keep their k first answers
        dt, rt = drop_self(d[tr], r[tr], at[tr])
        w = dt.shape[1]
        dist[at[tr], :w], rows[at[tr], :w] = dt, rt
        w2 = min(k, kk)
        dist[at[~tr], :w2], rows[at[~tr], :w2] = d[~tr, :w2], r[~tr, :w2]
    del index, base, emb
    out = {"dist": dist, "rows": rows, "kind": kind, "seconds": time.perf_counter() - t0}
    if cache and queries is None:
        store[key] = out
    return out


def embedding_keys(feats: dict) -> list[str]:
    """The embedding arrays of embeddings.npz: "emb" (the scored model) then "emb_1", "emb_2", … (the
    other seed models' embeddings of the same rows, written by `clean score` with score.seed_embeddings)."""
    from pipeline.rules.base import is_seed_embedding

    extra = sorted({k for k in [*feats, *feats.get("_later", {})] if is_seed_embedding(k)}, key=lambda k: int(k[4:]))
    return ["emb"] + extra


def embedding(feats: dict, key: str) -> np.ndarray:
    """The embedding array `key` [M, D] of `feats`, read from embeddings.npz on first use when load_features
    left it there (the other seed models'); CleanError when it does not have one row per id."""
    from pipeline.errors import CleanError

    if key not in feats:
        path = feats["_later"][key]
        with np.load(path, allow_pickle=False) as z:
            x = z[key]
    else:
        x, path = feats[key], "embeddings.npz"
    if x.ndim != 2 or len(x) != len(feats["ids"]):
        raise CleanError(f"{path}: '{key}' has shape {x.shape}, not one row per id ({len(feats['ids'])}); "
                         "the file is damaged: re-run `clean score`")
    return x
