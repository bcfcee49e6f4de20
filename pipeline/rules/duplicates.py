"""Duplicate sets: exact copies (equal pixel hash) and near copies (pixel-verified, or embeddings).

Pairs (docs/methods.md §2.2):
- exact: the decoded pixels hash equal (any splits);
- near, when embeddings.npz has thumbnails (`thumb`, written by `clean score`): candidate pairs
  from a shift/flip-invariant pixel descriptor and the embedding k-NN, each verified after
  alignment (pipeline/rules/copies.py: centred, the best of a few views, then a fitted
  similarity transform) — a copy survives a shift, a crop of ≥ 80 % of the area,
  a mirror image, a small rotation, brightness/contrast and JPEG re-encoding. A pair is kept
  when its aligned distance is below flag.copy_ratio × the distance the two rows see from
  their ordinary neighbours;
- near, without thumbnails (older files): j among i's k nearest training embeddings at cosine
  distance < τ · median nearest-neighbour distance (τ = flag.duplicate_tau, cleanlab's rule).
Near pairs are grouped by **mutual** nearest neighbours (an edge is kept only when each row
ranks the other among its MUTUAL_TOP closest partners), so no chain of look-alikes grows
into a giant set. A set is reported when it holds a training image. Within a set:
- `is_duplicate` marks every training member except the one kept: the member whose label
  has the most support — the set's most common label, ties broken by the share of the
  member's k nearest training neighbours (outside the set) that carry its label, then the
  lowest id. So in a label conflict the copy filed under the odd class is the one flagged.
- `is_leakage` (the `leakage` type) marks every training member of a set that also holds a
  val/test image; issues.json lists each (train id, val/test id) pair with its distance.
- `duplicate_of`: the id of the member kept (or, for leakage, the val/test copy);
  `duplicate_score` = 1 − distance to the nearest other member (1 for an exact copy);
  `duplicate_cut` = the distance that pair had to be under (flag.copy_ratio × the two rows'
  ordinary-neighbour distance for a pixel-verified pair, the radius for an embedding pair, 0 for
  the same pixels).
"""
from __future__ import annotations

import numpy as np

from pipeline.config import FlagConfig
from pipeline.registry import ISSUES
from pipeline.rules.base import IssueResult

#: example ids listed per finding in the summary
N_EXAMPLES = 10
#: near pairs kept: each row's closest partners, both ways (mutual nearest neighbours)
MUTUAL_TOP = 3
#: leakage pairs listed in issues.json at most (the count is always exact)
MAX_LEAK_PAIRS = 10_000


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


def _near_embedding(nn: dict, pos: np.ndarray, tau: float):
    """Near pairs by embedding distance < τ · median NN distance → (a, b, d, cut [P], facts)."""
    dist, rows = nn["dist"], nn["rows"]
    m, n = len(dist), len(pos)
    nn1 = dist[pos, 0] if n > 1 else np.zeros(n, np.float32)
    finite = np.isfinite(nn1)
    median_nn = float(np.median(nn1[finite])) if finite.any() else 0.0
    radius = float(tau) * max(median_nn, float(np.finfo(np.float32).eps))
    close = (dist < radius) & (rows >= 0)
    a = np.repeat(np.arange(m), dist.shape[1])[close.ravel()]
    facts = {"method": "embedding", "tau": float(tau), "median_nn_distance": median_nn, "radius": radius}
    rule = f"cosine distance < {tau:g} × median NN distance ({radius:.3g})"
    # a cosine distance is ≥ 0; float rounding of identical embeddings gives −1e-7
    d = np.maximum(dist[close].astype(np.float64), 0.0)
    return a, rows[close], d, np.full(len(a), radius), {**facts, "near_rule": rule}


def _near_pixels(feats: dict, nn: dict, pos: np.ndarray, ratio: float, seed: int, exact_max: int):
    """Near pairs verified on the thumbnails (rules/copies.py) → (a, b, d, cut [P], facts); a pair's cut is
    the distance it had to be under: ratio × its rows' ordinary-neighbour distance (or D_EXACT, if larger)."""
    from pipeline.rules import copies

    k = min(5, nn["rows"].shape[1])
    ea = np.repeat(np.arange(len(nn["rows"])), k)
    eb = nn["rows"][:, :k].ravel()
    ok = eb >= 0
    res = copies.copy_pairs(feats["thumb"], pos, ratio, extra=(ea[ok], eb[ok]), exact_max=exact_max, seed=seed)
    rule = (f"aligned pixel distance ≤ {ratio:g} × the pair's ordinary-neighbour distance "
            f"(centred; mirror, ±6°, zoom ×0.92/1.08, then a fitted zoom/rotation/shift)")
    facts = {"method": "pixels", "copy_ratio": float(ratio), "d_exact": copies.D_EXACT, "n_candidates": res["n_candidates"],
             "n_screened": res["n_screened"], "n_verified": res["n_verified"], "near_rule": rule}
    cut = np.fmax(ratio * res["ref"], copies.D_EXACT)
    return res["a"], res["b"], res["d"], cut, facts


def _nearest_edge(m: int, a: np.ndarray, b: np.ndarray, d: np.ndarray, cut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row [m]: the distance of its nearest edge (inf without one) and that edge's cut (NaN without one);
    of edges at the same distance, the one with the smallest cut (a pixel-identical pair found as a near pair
    too is named by its hash: cut 0)."""
    nearest, nearest_cut = np.full(m, np.inf), np.full(m, np.nan)
    if len(a):
        rows, dist, cuts = np.r_[a, b].astype(np.int64), np.r_[d, d], np.r_[cut, cut]
        o = np.lexsort((cuts, dist, rows))
        first = o[np.r_[True, rows[o][1:] != rows[o][:-1]]]  # each row's nearest edge
        nearest[rows[first]], nearest_cut[rows[first]] = dist[first], cuts[first]
    return nearest, nearest_cut


def _mutual(a: np.ndarray, b: np.ndarray, d: np.ndarray, top: int = MUTUAL_TOP) -> np.ndarray:
    """bool [P]: pairs among the `top` closest of both rows (mutual nearest neighbours)."""
    from pipeline.rules.copies import _rank_in_row

    if not len(a):
        return np.zeros(0, bool)
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    rank = _rank_in_row(np.r_[a, b], np.r_[d, d])
    return (rank[:len(a)] < top) & (rank[len(a):] < top)


def _sets(m: int, a: np.ndarray, b: np.ndarray, pos: np.ndarray, ids_all: np.ndarray) -> np.ndarray:
    """Set id per row [m] (−1 outside): connected components with ≥ 2 members and a training
    member, numbered by their smallest training id."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not m:
        return np.zeros(0, np.int64)
    g = coo_matrix((np.ones(len(a)), (a, b)), shape=(m, m))
    _, comp = connected_components(g, directed=False)
    size = np.bincount(comp, minlength=comp.max() + 1)
    train_in = np.bincount(comp[pos], minlength=len(size))
    first_id = np.full(len(size), np.iinfo(np.int64).max)
    np.minimum.at(first_id, comp[pos], ids_all[pos])
    kept = np.flatnonzero((size >= 2) & (train_in >= 1))
    kept = kept[np.argsort(first_id[kept], kind="stable")]
    gid = np.full(len(size), -1, np.int64)
    gid[kept] = np.arange(len(kept))
    return gid[comp]


def _support(nn: dict, lab: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Share of each row's k nearest training neighbours, outside its own set, carrying its label → [m]."""
    rows = nn["rows"]
    ok = (rows >= 0) & ~((group[np.clip(rows, 0, None)] == group[:, None]) & (group[:, None] >= 0))
    agree = ok & (lab[np.clip(rows, 0, None)] == lab[:, None])
    return agree.sum(1) / np.maximum(ok.sum(1), 1)


def _keepers(group: np.ndarray, tr_rows: np.ndarray, lab: np.ndarray, support: np.ndarray,
             ids_all: np.ndarray, n_groups: int) -> np.ndarray:
    """The training row kept per set [G]: most common label in the set's training members, then
    the highest neighbour support, then the lowest id (−1: a set with no training member)."""
    rep = np.full(n_groups, -1, np.int64)
    r = tr_rows[group[tr_rows] >= 0]
    if not len(r):
        return rep
    g, y = group[r], lab[r]
    gl, inv, cnt = np.unique(np.c_[g, y], axis=0, return_inverse=True, return_counts=True)
    votes = cnt[inv.ravel()]
    o = np.lexsort((ids_all[r], -support[r], -votes, g))
    first = np.r_[True, g[o][1:] != g[o][:-1]]
    rep[g[o][first]] = r[o][first]
    return rep


def _per_set(group: np.ndarray, rows: np.ndarray, values: np.ndarray, n_groups: int) -> np.ndarray:
    """Number of distinct `values` among the members `rows` of each set → int [G]."""
    if not len(rows):
        return np.zeros(n_groups, np.int64)
    pairs = np.unique(np.c_[group[rows].astype(np.uint64), values[rows].astype(np.uint64)], axis=0)
    return np.bincount(pairs[:, 0].astype(np.int64), minlength=n_groups)


def _leak_pairs(group: np.ndarray, is_train: np.ndarray, ids_all: np.ndarray, split, emb_d) -> list[dict]:
    """Every (train id, val/test id) pair of the same set, with the eval split and their distance."""
    mrows = np.flatnonzero(group >= 0)
    tr, ev = mrows[is_train[mrows]], mrows[~is_train[mrows]]
    if not len(ev):
        return []
    o = np.argsort(group[tr], kind="stable")
    tr = tr[o]
    lo = np.searchsorted(group[tr], group[ev], "left")
    hi = np.searchsorted(group[tr], group[ev], "right")
    e = np.repeat(ev, hi - lo)
    t = tr[np.concatenate([np.arange(x, y) for x, y in zip(lo, hi)])] if len(ev) else np.zeros(0, np.int64)
    d = emb_d(t, e)
    return [{"train_id": int(ids_all[i]), "eval_id": int(ids_all[j]), "split": str(split[j]) if split is not None else "",
             "distance": round(float(x), 6)} for i, j, x in zip(t[:MAX_LEAK_PAIRS], e[:MAX_LEAK_PAIRS], d[:MAX_LEAK_PAIRS])]


def _pairs(feats: dict, nn: dict, pos: np.ndarray, tau: float, ratio: float, seed: int, exact_max: int):
    """All duplicate edges (exact hash stars + mutual near pairs) → (a, b, d, cut, facts); an exact pair's
    cut is 0 (the same pixels)."""
    if "thumb" in feats and ratio > 0:
        a, b, d, cut, facts = _near_pixels(feats, nn, pos, ratio, seed, exact_max)
    else:
        a, b, d, cut, facts = _near_embedding(nn, pos, tau)
    mutual = _mutual(a, b, d)
    facts["n_near_pairs"], facts["n_near_pairs_mutual"] = int(len(a)), int(mutual.sum())
    a_ex, b_ex = _edges_exact(np.asarray(feats["hash"]).astype(np.uint64))
    zero = np.zeros(len(a_ex))
    return (np.r_[a[mutual], a_ex], np.r_[b[mutual], b_ex], np.r_[d[mutual], zero].astype(np.float64),
            np.r_[cut[mutual], zero].astype(np.float64), facts)


def find_duplicates(feats: dict, labels_train: np.ndarray, ids_train: np.ndarray, tau: float = 0.13,
                    k: int = 10, exact_max: int | None = None, seed: int = 0, ratio: float = 0.2) -> IssueResult:
    """Duplicate sets of the training samples (feats: load_features' dict; ids/labels [N] in
    train_pos order). ratio: flag.copy_ratio (pixel verification; 0 = embeddings only)."""
    from pipeline.rules import knn

    pos = np.asarray(feats["train_pos"], np.int64)
    m, n = len(feats["ids"]), len(pos)
    em = knn.EXACT_MAX if exact_max is None else exact_max
    nn = knn.train_knn(feats, k, em, seed)
    a, b, d, cut, facts = _pairs(feats, nn, pos, tau, ratio, seed, em)
    ids_all = np.asarray(feats["ids"], np.int64)
    group = _sets(m, a, b, pos, ids_all)
    n_groups = int(group.max()) + 1 if m and len(group) and group.max() >= 0 else 0
    is_train = np.zeros(m, bool)
    is_train[pos] = True
    lab = np.asarray(feats["label"], np.int64).copy() if "label" in feats else np.full(m, -1, np.int64)
    lab[pos] = labels_train  # the scored labels (they carry injected noise where any)
    rep = _keepers(group, pos, lab, _support(nn, lab, group), ids_all, n_groups)
    nearest, nearest_cut = _nearest_edge(m, a, b, d, cut)
    mrows = np.flatnonzero(group >= 0)
    conflict_g = _per_set(group, mrows, lab, n_groups) > 1
    leak_g = np.bincount(group[mrows[~is_train[mrows]]], minlength=n_groups) > 0
    exact_g = _per_set(group, mrows, np.asarray(feats["hash"]).astype(np.uint64), n_groups) == 1
    g_tr = group[pos]
    in_set = g_tr >= 0
    gi = np.where(in_set, g_tr, 0)
    flagged = in_set & (rep[gi] != pos) if n_groups else np.zeros(n, bool)
    leak = in_set & leak_g[gi] if n_groups else np.zeros(n, bool)
    conflict = in_set & conflict_g[gi] if n_groups else np.zeros(n, bool)
    near_d = np.where(in_set, nearest[pos], nn["dist"][pos, 0] if n > 1 else 1.0)
    score = 1.0 - np.where(np.isfinite(near_d), near_d, 1.0)
    kept_id = np.where(in_set & (rep[gi] >= 0), ids_all[np.clip(rep[gi], 0, None)], -1) if n_groups else np.full(n, -1)
    emb = knn.normalize(feats["emb"])
    split = np.asarray(feats["split"]).astype(str) if "split" in feats else None
    pairs = _leak_pairs(group, is_train, ids_all, split, lambda i, j: 1.0 - (emb[i] * emb[j]).sum(1))
    summary = _summary(group, is_train, ids_all, lab, split, n_groups, exact_g, conflict_g, leak_g,
                       flagged, in_set, conflict, leak, pairs, {**facts, "k": int(k), "index": nn["kind"]})
    rule = (f"same pixel hash, or {facts['near_rule']}; mutual nearest partners; all copies but the "
            "best-supported one per set")
    return IssueResult(flagged=flagged, score=score.astype(np.float64), rule=rule,
                       columns={"duplicate_group": g_tr.astype(np.int64), "duplicate_of": kept_id.astype(np.int64),
                                "duplicate_conflict": conflict, "duplicate_leak": leak,
                                "duplicate_cut": np.where(in_set, nearest_cut[pos], np.nan)},
                       summary=summary)


def _summary(group, is_train, ids_all, lab, split, n_groups, exact_g, conflict_g, leak_g, flagged, in_set,
             conflict, leak, pairs, facts) -> dict:
    """issues.json facts of the duplicate check: counts, conflicts, leakage pairs, example sets."""
    mrows = np.flatnonzero(group >= 0)
    mg = group[mrows]

    def examples(mask_g):
        out = []
        for gidx in np.flatnonzero(mask_g)[:N_EXAMPLES]:
            r = mrows[mg == gidx]
            out.append({"group": int(gidx), "train_ids": ids_all[r[is_train[r]]].tolist(),
                        "eval_ids": ids_all[r[~is_train[r]]].tolist(), "labels": sorted(set(lab[r].tolist()))})
        return out

    eval_rows = mrows[~is_train[mrows]]
    by_split = ({s: int(c) for s, c in zip(*np.unique(split[eval_rows], return_counts=True))}
                if split is not None and len(eval_rows) else {})
    return {
        "n_groups": int(n_groups), "n_exact_groups": int(exact_g.sum()), "n_near_groups": int((~exact_g).sum()),
        "n_flagged": int(flagged.sum()), "n_in_groups": int(in_set.sum()), **facts,
        "conflicts": {"n_groups": int(conflict_g.sum()), "n_train_images": int(conflict.sum()),
                      "examples": examples(conflict_g)},
        "leakage": {"n_groups": int(leak_g.sum()), "n_eval_images": int(len(eval_rows)),
                    "n_train_images": int(leak.sum()), "by_split": by_split, "n_pairs": len(pairs),
                    "pairs": pairs, "examples": examples(leak_g)},
        "examples": examples(np.ones(n_groups, bool)),
    }


def cached_duplicates(inputs, cfg: FlagConfig) -> IssueResult:
    """find_duplicates on the flag stage's inputs, computed once (shared by `duplicate` and `leakage`)."""
    feats = inputs.features()
    key = ("_duplicates", cfg.duplicate_tau, cfg.outlier_k, cfg.copy_ratio, cfg.seed)
    cache = feats.setdefault("_cache", {})
    if key not in cache:
        cache[key] = find_duplicates(feats, inputs.labels, inputs.ids, tau=cfg.duplicate_tau, k=cfg.outlier_k,
                                     seed=cfg.seed, ratio=cfg.copy_ratio)
    return cache[key]


@ISSUES.register("duplicate", needs=("embeddings",),
                 doc="exact (pixel hash) and near copies (pixel-verified after alignment: flag.copy_ratio; "
                     "embeddings when no thumbnails); all but the best-supported copy per set")
def duplicate(inputs, cfg: FlagConfig) -> IssueResult:
    return cached_duplicates(inputs, cfg)


@ISSUES.register("leakage", needs=("embeddings",),
                 doc="training images with an exact or near copy in val/test (each pair in issues.json)")
def leakage(inputs, cfg: FlagConfig) -> IssueResult:
    res = cached_duplicates(inputs, cfg)
    leak = np.asarray(res.columns["duplicate_leak"], bool)
    lk = res.summary["leakage"]
    tr = np.asarray([p["train_id"] for p in lk["pairs"]], np.int64)
    ev = np.asarray([p["eval_id"] for p in lk["pairs"]], np.int64)
    u, first = np.unique(tr, return_index=True)  # each training id → its first-listed val/test copy
    at = np.clip(np.searchsorted(u, inputs.ids), 0, max(len(u) - 1, 0))
    found = leak & (u[at] == inputs.ids) if len(u) else np.zeros(len(leak), bool)
    leakage_of = np.where(found, ev[first][at] if len(u) else -1, -1).astype(np.int64)
    return IssueResult(flagged=leak, score=np.where(leak, res.score, 0.0), rule="a copy of a val/test image",
                       columns={"leakage_of": leakage_of},
                       summary={"n_flagged": int(leak.sum()), "n_pairs": lk["n_pairs"], "pairs": lk["pairs"],
                                "by_split": lk["by_split"]})
