"""Duplicate sets: exact copies (equal pixel hash) and near copies (cosine distance of embeddings).

A pair (i, j) is a duplicate when the decoded pixels hash equal (any splits) or when j is
among i's k nearest training embeddings (pipeline/rules/knn.py, faiss) at cosine distance
below τ · median nearest-neighbour distance (τ = 0.13: cleanlab Datalab's near-duplicate rule).
Pairs are grouped into duplicate sets (connected components); a set is reported when it holds
a training image. Within a set:
- `is_duplicate` marks every training member except one representative — the copy a user
  keeps — so dropping the flagged images leaves each image once. The representative is the
  lowest id among the members carrying the set's most common label. When the set also holds a
  val/test image (leakage) every training member is flagged: keeping any of them leaks.
- `duplicate_score` = 1 − cosine distance to the nearest other member (1 for an exact copy);
  outside sets 1 − distance to the nearest training neighbour (rank only, not flagged).
- `duplicate_conflict`: the set's members carry different labels; `duplicate_leak`: the set
  spans train and val/test.
"""
from __future__ import annotations

import numpy as np

from pipeline.config import FlagConfig
from pipeline.registry import ISSUES
from pipeline.rules import knn
from pipeline.rules.base import IssueResult

#: example ids listed per finding in the summary
N_EXAMPLES = 10


def _edges_exact(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (a, b) chaining the rows that share a hash (a star to each value's first row)."""
    order = np.argsort(hashes, kind="stable")
    h = hashes[order]
    same = np.flatnonzero(h[1:] == h[:-1]) + 1  # positions whose hash equals the previous one
    if not len(same):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # first row of each run of equal hashes
    starts = np.r_[0, np.flatnonzero(h[1:] != h[:-1]) + 1]
    run_start = starts[np.searchsorted(starts, same, side="right") - 1]
    return order[run_start].astype(np.int64), order[same].astype(np.int64)


def find_duplicates(feats: dict, labels_train: np.ndarray, ids_train: np.ndarray, tau: float = 0.13,
                    k: int = 10, exact_max: int | None = None, seed: int = 0) -> IssueResult:
    """Duplicate sets of the training samples (feats: load_features' dict; ids/labels in train_pos order)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pos = np.asarray(feats["train_pos"], np.int64)
    m, n = len(feats["ids"]), len(pos)
    nn = knn.train_knn(feats, k, knn.EXACT_MAX if exact_max is None else exact_max, seed)
    dist, rows = nn["dist"], nn["rows"]
    is_train = np.zeros(m, bool)
    is_train[pos] = True
    nn1 = dist[pos, 0] if n > 1 else np.zeros(n, np.float32)
    finite = np.isfinite(nn1)
    median_nn = float(np.median(nn1[finite])) if finite.any() else 0.0
    radius = float(tau) * max(median_nn, float(np.finfo(np.float32).eps))
    # near pairs: every row (train or val/test) with the training neighbours inside the radius
    close = (dist < radius) & (rows >= 0)
    a_near = np.repeat(np.arange(m), dist.shape[1])[close.ravel()]
    b_near = rows[close]
    d_near = dist[close]
    a_ex, b_ex = _edges_exact(np.asarray(feats["hash"]).astype(np.uint64))
    a = np.r_[a_near, a_ex]
    b = np.r_[b_near, b_ex]
    d = np.r_[d_near, np.zeros(len(a_ex), np.float32)].astype(np.float64)
    g = coo_matrix((np.ones(len(a)), (a, b)), shape=(m, m))
    _, comp = connected_components(g, directed=False)
    # components with ≥ 2 members and a training member
    size = np.bincount(comp, minlength=comp.max() + 1 if m else 0)
    train_in = np.bincount(comp[pos], minlength=len(size))
    keep_comp = (size >= 2) & (train_in >= 1)
    # number the kept sets by their smallest training id (deterministic)
    ids_all = np.asarray(feats["ids"], np.int64)
    first_id = np.full(len(size), np.iinfo(np.int64).max)
    np.minimum.at(first_id, comp[pos], ids_all[pos])
    kept = np.flatnonzero(keep_comp)
    kept = kept[np.argsort(first_id[kept], kind="stable")]
    gid_of_comp = np.full(len(size), -1, np.int64)
    gid_of_comp[kept] = np.arange(len(kept))
    group_all = gid_of_comp[comp] if m else np.zeros(0, np.int64)
    # nearest other member: min over the pairs touching each row
    nearest = np.full(m, np.inf)
    np.minimum.at(nearest, a, d)
    np.minimum.at(nearest, b, d)
    n_groups = len(kept)
    # per set: labels, exact-only, leakage
    labels_all = np.asarray(feats["label"], np.int64) if "label" in feats else None
    lab = labels_all if labels_all is not None else np.full(m, -1, np.int64)
    lab = lab.copy()
    lab[pos] = labels_train  # the scored labels (they carry injected noise where any)
    member = group_all >= 0
    mrows = np.flatnonzero(member)
    mg = group_all[mrows]
    n_lab = np.zeros(n_groups, np.int64)
    if len(mrows):
        pairs = np.unique(np.c_[mg, lab[mrows]], axis=0)
        n_lab = np.bincount(pairs[:, 0], minlength=n_groups)
    conflict_g = n_lab > 1
    n_eval = np.bincount(mg[~is_train[mrows]], minlength=n_groups) if len(mrows) else np.zeros(n_groups, np.int64)
    n_tr = np.bincount(mg[is_train[mrows]], minlength=n_groups) if len(mrows) else np.zeros(n_groups, np.int64)
    leak_g = n_eval > 0
    hashes = np.asarray(feats["hash"]).astype(np.uint64)
    n_hash = np.zeros(n_groups, np.int64)
    if len(mrows):
        hp = np.unique(np.c_[mg.astype(np.uint64), hashes[mrows]], axis=0)
        n_hash = np.bincount(hp[:, 0].astype(np.int64), minlength=n_groups)
    exact_g = n_hash == 1
    # representative per set without leakage: lowest id among the training members with the set's
    # most common label (ties: the smaller label)
    rep_row = np.full(n_groups, -1, np.int64)
    tr_rows = mrows[is_train[mrows]]
    if len(tr_rows):
        tg, tl = group_all[tr_rows], lab[tr_rows]
        gl, cnt = np.unique(np.c_[tg, tl], axis=0, return_counts=True)
        o = np.lexsort((gl[:, 1], -cnt, gl[:, 0]))  # per group: highest count, then smaller label
        gl = gl[o]
        first = np.r_[True, gl[1:, 0] != gl[:-1, 0]]
        maj = np.full(n_groups, -1, np.int64)
        maj[gl[first, 0]] = gl[first, 1]
        cand = tr_rows[tl == maj[tg]]
        cg = group_all[cand]
        o = np.lexsort((ids_all[cand], cg))
        cand, cg = cand[o], cg[o]
        f = np.r_[True, cg[1:] != cg[:-1]]
        rep_row[cg[f]] = cand[f]
    # per training sample (inputs.ids order)
    g_tr = group_all[pos]
    in_set = g_tr >= 0
    flagged = in_set.copy()
    gi = g_tr[in_set]
    is_rep = np.zeros(n, bool)
    is_rep[in_set] = (rep_row[gi] == pos[in_set]) & ~leak_g[gi]
    flagged &= ~is_rep
    near_d = np.where(in_set, nearest[pos], nn1)
    score = 1.0 - np.where(np.isfinite(near_d), near_d, 1.0)
    conflict = np.zeros(n, bool)
    leak = np.zeros(n, bool)
    conflict[in_set] = conflict_g[gi]
    leak[in_set] = leak_g[gi]

    def examples(mask_g):
        out = []
        for gidx in np.flatnonzero(mask_g)[:N_EXAMPLES]:
            r = mrows[mg == gidx]
            out.append({"group": int(gidx), "train_ids": ids_all[r[is_train[r]]].tolist(),
                        "eval_ids": ids_all[r[~is_train[r]]].tolist(),
                        "labels": sorted(set(lab[r].tolist()))})
        return out

    split = np.asarray(feats["split"]).astype(str) if "split" in feats else None
    eval_rows = mrows[~is_train[mrows]]
    summary = {
        "n_groups": int(n_groups), "n_exact_groups": int(exact_g.sum()), "n_near_groups": int((~exact_g).sum()),
        "n_flagged": int(flagged.sum()), "n_in_groups": int(in_set.sum()),
        "tau": float(tau), "median_nn_distance": median_nn, "radius": radius, "k": int(k), "index": nn["kind"],
        "conflicts": {"n_groups": int(conflict_g.sum()), "n_train_images": int(conflict.sum()),
                      "examples": examples(conflict_g)},
        "leakage": {"n_groups": int(leak_g.sum()), "n_eval_images": int(len(eval_rows)),
                    "n_train_images": int(leak.sum()),
                    "by_split": ({s: int(c) for s, c in zip(*np.unique(split[eval_rows], return_counts=True))}
                                 if split is not None and len(eval_rows) else {}),
                    "examples": examples(leak_g)},
        "examples": examples(np.ones(n_groups, bool)),
    }
    rule = (f"same pixel hash, or cosine distance < {tau:g} × median NN distance ({radius:.3g}); "
            "all copies but one per set (all train copies of a set that reaches val/test)")
    return IssueResult(flagged=flagged, score=score.astype(np.float64), rule=rule,
                       columns={"duplicate_group": g_tr.astype(np.int64), "duplicate_conflict": conflict,
                                "duplicate_leak": leak},
                       summary=summary)


@ISSUES.register("duplicate", needs=("embeddings",),
                 doc="exact (pixel hash) and near (cosine distance < flag.duplicate_tau × median NN distance) "
                     "copies; all but one per set, conflicts and train/val/test leakage reported")
def duplicate(inputs, cfg: FlagConfig) -> IssueResult:
    feats = inputs.features()
    return find_duplicates(feats, inputs.labels, inputs.ids, tau=cfg.duplicate_tau,
                           k=cfg.outlier_k, seed=cfg.seed)
