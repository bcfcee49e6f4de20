"""Compare two score files: how much do their top-k sets overlap (paper, §5)?

overlap(k) = |S_A,k ∩ S_B,k| / k, where S_X,k are the k samples ranked highest by score X.
Two independent random k-subsets of N samples overlap by k/N in expectation: the random
baseline. "Top" means most suspicious: the largest value for most scores, the smallest for
the scores where low is bad (margin, aum, confidence: pipeline/scores/order.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import CleanError
from pipeline.formats.tables import read_scores
from pipeline.scores.order import ranks, top_order  # noqa: F401  (re-used by callers of compare)

def _aligned(a, b) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Align two score vectors: pandas Series are matched by index (the ids)."""
    import pandas as pd

    if isinstance(a, pd.Series) and isinstance(b, pd.Series):
        ia, ib = pd.Index(a.index), pd.Index(b.index)
        if ia.has_duplicates or ib.has_duplicates:
            raise CleanError("score files must have unique ids; found duplicate ids")
        if len(ia) != len(ib) or not ia.isin(ib).all():
            only_a = ia.difference(ib)
            only_b = ib.difference(ia)
            ex = f"e.g. id {only_a[0]} only in the first" if len(only_a) else f"e.g. id {only_b[0]} only in the second"
            raise CleanError(f"the two score files cover different samples ({len(only_a)} id(s) only in the first, "
                             f"{len(only_b)} only in the second; {ex}); score the same manifest/split with both models")
        b = b.reindex(ia)
        return a.to_numpy(np.float64), b.to_numpy(np.float64), ia.to_numpy()
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise CleanError(f"scores must be two 1-D arrays of the same length, got shapes {a.shape} and {b.shape}")
    return a, b, None


def topk_overlap(a, b, ks=None, by: str = "") -> np.ndarray:
    """Overlap fractions |S_A,k ∩ S_B,k| / k for each k in `ks` → float [len(ks)].

    `a`, `b`: scores [N] (numpy arrays aligned by position, or pandas Series indexed by id,
    aligned by id; differing id sets → CleanError). `ks`: ints in [1, N]; None → 1..N.
    O(N log N) for all k at once: a sample is in both top-k sets iff max(rank_A, rank_B) < k.
    """
    a, b, ids = _aligned(a, b)
    n = a.size
    if n == 0:
        raise CleanError("cannot compare empty score files")
    ks = np.arange(1, n + 1) if ks is None else np.asarray(ks, dtype=np.int64).ravel()
    if ks.size and (ks.min() < 1 or ks.max() > n):
        raise CleanError(f"k must be in [1, {n}] (the number of samples), got {int(ks.min())}..{int(ks.max())}")
    both = np.maximum(ranks(a, by, ids), ranks(b, by, ids))  # in both top-k iff both < k
    inside = np.cumsum(np.bincount(both, minlength=n))  # inside[k-1] = #{both <= k-1}
    return inside[ks - 1] / ks


def k_grid(n: int, points: int = 200) -> np.ndarray:
    """About `points` distinct k in [1, n]: every k up to 20, then log- and linearly spaced (int [M])."""
    if n < 1:
        return np.zeros(0, dtype=np.int64)
    g = np.concatenate([np.arange(1, min(n, 20) + 1), np.geomspace(1, n, points // 2),
                        np.linspace(1, n, points // 2)])
    return np.unique(np.clip(np.round(g), 1, n).astype(np.int64))


def read_score(path: str | Path, by: str):
    """Column `by` of a scores CSV as a pandas Series indexed by id (float)."""
    import pandas as pd

    df = read_scores(path, need=[by])
    vals = df[by]
    if vals.isna().all():
        raise CleanError(f"{path}: column '{by}' has no numeric values (all empty/NaN); pick another score "
                         "or re-run `clean score` with it enabled")
    return pd.Series(vals.to_numpy(np.float64), index=pd.Index(df["id"].to_numpy(), name="id"), name=by)


def compare_files(scores_a: str | Path, scores_b: str | Path, by: str = "grad_norm", ks=None) -> dict:
    """Top-k overlap of two score files (same ids) → {"k": int [M], "overlap": [M], "random": [M], "n": N}.

    `ks` None → :func:`k_grid`. random = k/N, the expected overlap of two random subsets.
    """
    a, b = read_score(scores_a, by), read_score(scores_b, by)
    try:
        n = len(a)
        ks = k_grid(n) if ks is None else np.asarray(ks, dtype=np.int64)
        ov = topk_overlap(a, b, ks, by=by)
    except CleanError as e:
        raise CleanError(f"{scores_a} vs {scores_b}: {e}") from None
    return {"k": ks, "overlap": ov, "random": ks / n, "n": n}
