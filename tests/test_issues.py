"""Duplicate, outlier and image-property issue types on synthetic features with planted truth."""
from __future__ import annotations

import itertools
import os

import numpy as np
import pandas as pd
import pytest

from pipeline.config import FlagConfig
from pipeline.rules import images, knn
from pipeline.rules.duplicates import find_duplicates
from pipeline.rules.outliers import knn_outliers


def _feats(emb, split=None, label=None, hashes=None, **stats):
    """An embeddings.npz-like dict with train_pos = the training rows in order."""
    m = len(emb)
    split = np.array(["train"] * m if split is None else split, dtype="U5")
    f = {"ids": np.arange(m, dtype=np.int64) * 10 + 7, "split": split,
         "label": np.zeros(m, np.int64) if label is None else np.asarray(label, np.int64),
         "emb": np.asarray(emb, np.float16),
         "hash": np.arange(1, m + 1, dtype=np.uint64) * 7919 if hashes is None else np.asarray(hashes, np.uint64)}
    f.update({k: np.asarray(v, np.float32) for k, v in stats.items()})
    f["train_pos"] = np.flatnonzero(split == "train").astype(np.int64)
    return f


def _brute(emb_all, pos, k):
    """Reference: for every row, the k smallest cosine distances to the training rows (itself excluded)."""
    x = emb_all.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    d = 1.0 - x @ x[pos].T
    for j, p in enumerate(pos):
        d[p, j] = np.inf
    return np.sort(d, axis=1)[:, :k]


def test_knn_exact_matches_brute_force():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(300, 16)).astype(np.float16)
    split = np.where(rng.random(300) < 0.2, "test", "train")
    f = _feats(emb, split)
    got = knn.train_knn(f, 5)
    ref = _brute(emb, f["train_pos"], 5)
    assert got["kind"].startswith("flat")
    np.testing.assert_allclose(got["dist"], ref, atol=2e-5)
    # neighbours are training rows and never the row itself
    assert np.isin(got["rows"], f["train_pos"]).all()
    assert not (got["rows"] == np.arange(300)[:, None]).any()
    # the outlier score is the k-th of those distances, on the training rows
    out = knn_outliers(f, k=5)
    np.testing.assert_allclose(out.score, ref[f["train_pos"], 4], atol=2e-5)


def test_knn_approximate_index_finds_close_neighbours():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(400, 32))
    emb = np.repeat(centres, 5, axis=0) + 0.01 * rng.normal(size=(2000, 32))
    f = _feats(emb)
    got = knn.train_knn(f, 4, exact_max=0)
    assert got["kind"].startswith("ivf")
    ref = _brute(emb, f["train_pos"], 4)
    # the four members of each tight cluster are found (recall of the 1st neighbour ≥ 0.97)
    assert np.mean(np.abs(got["dist"][:, 0] - ref[:, 0]) < 1e-4) >= 0.97


def test_drop_self_when_copies_tie():
    dist = np.zeros((2, 3), np.float32)
    rows = np.array([[5, 6, 7], [1, 0, 2]])
    d, r = knn.drop_self(dist, rows, np.array([9, 0]))
    assert r.tolist() == [[5, 6], [1, 2]]


def _planted_dup_set():
    """Train blob of 200 + planted: exact copy, near copy, 3-member near set with a label conflict,
    a test copy of a train image (leakage), an exact val/test pair of another train image."""
    rng = np.random.default_rng(2)
    n = 200
    emb = rng.normal(size=(n, 24))
    label = rng.integers(0, 3, n)
    split = ["train"] * n
    hashes = list(np.arange(1, n + 1) * 7919)
    extra = []

    def add(row_emb, lab, sp, h):
        emb_l.append(row_emb)
        label_l.append(lab)
        split.append(sp)
        hashes.append(h)
        extra.append(len(split) - 1)

    emb_l, label_l = list(emb), list(label)
    add(emb[0], label[0], "train", hashes[0])                                 # 200: exact copy of 0
    add(emb[1] + 1e-3 * rng.normal(size=24), label[1], "train", 10**9 + 1)    # 201: near copy of 1
    add(emb[2] + 1e-3 * rng.normal(size=24), (label[2] + 1) % 3, "train", 10**9 + 2)  # 202: conflict with 2
    add(emb[2] + 1e-3 * rng.normal(size=24), label[2], "train", 10**9 + 3)    # 203: same set as 2
    add(emb[3] + 1e-3 * rng.normal(size=24), label[3], "test", 10**9 + 4)     # 204: test copy of 3 (leak)
    add(emb[4], label[4], "val", hashes[4])                                   # 205: val exact copy of 4 (leak)
    return _feats(np.array(emb_l), split, label_l, hashes)


def test_duplicate_groups_conflicts_leakage():
    f = _planted_dup_set()
    pos = f["train_pos"]
    ids, labels = f["ids"][pos], f["label"][pos]
    res = find_duplicates(f, labels, ids, tau=0.13, k=5)
    g = res.columns["duplicate_group"]
    row = {int(r): i for i, r in enumerate(pos)}  # npz row → training index
    groups = {}
    for i, gi in enumerate(g):
        if gi >= 0:
            groups.setdefault(int(gi), set()).add(int(pos[i]))
    assert sorted(map(sorted, groups.values())) == [[0, 200], [1, 201], [2, 202, 203], [3], [4]]
    s = res.summary
    assert s["n_groups"] == 5 and s["n_exact_groups"] == 2 and s["n_near_groups"] == 3  # {0,200}, {4,205}
    # one copy kept per set; {2, 202, 203}: row 2 kept (majority label, lowest id); {3}+test, {4}+val:
    # the training image is the set's only training copy: kept as a duplicate, marked as leakage
    flagged_rows = sorted(int(pos[i]) for i in np.flatnonzero(res.flagged))
    assert flagged_rows == [200, 201, 202, 203]
    kept = {int(pos[i]): int(res.columns["duplicate_of"][i]) for i in np.flatnonzero(g >= 0)}
    assert kept[202] == kept[203] == 27 and kept[201] == 17  # ids = 10 · row + 7
    conflict = {int(pos[i]) for i in np.flatnonzero(res.columns["duplicate_conflict"])}
    leak = {int(pos[i]) for i in np.flatnonzero(res.columns["duplicate_leak"])}
    assert conflict == {2, 202, 203} and leak == {3, 4}
    assert s["conflicts"]["n_groups"] == 1 and s["conflicts"]["examples"][0]["train_ids"] == [27, 2027, 2037]
    assert s["leakage"]["n_groups"] == 2 and s["leakage"]["n_eval_images"] == 2
    assert s["leakage"]["by_split"] == {"test": 1, "val": 1}
    assert sorted(e["eval_ids"][0] for e in s["leakage"]["examples"]) == [2047, 2057]
    # leakage per pair: (train id, val/test id, split)
    assert sorted((p["train_id"], p["eval_id"], p["split"]) for p in s["leakage"]["pairs"]) == [
        (37, 2047, "test"), (47, 2057, "val")]
    # score: 1 for exact copies, 1 − (small distance) for near ones, lower elsewhere
    assert res.score[row[200]] == 1.0 and res.score[row[0]] == 1.0
    assert 0.99 < res.score[row[201]] < 1.0
    assert np.all(res.score[g < 0] < 0.9)
    assert len(res.flagged) == len(res.score) == len(pos)


def test_duplicate_radius_is_tau_times_median_nn():
    f = _planted_dup_set()
    pos = f["train_pos"]
    res = find_duplicates(f, f["label"][pos], f["ids"][pos], tau=0.13, k=5)
    ref = _brute(f["emb"], pos, 1)[pos, 0]
    assert res.summary["median_nn_distance"] == pytest.approx(float(np.median(ref)), abs=1e-5)
    assert res.summary["radius"] == pytest.approx(0.13 * float(np.median(ref)), abs=1e-5)
    # no duplicates in a set of distinct random points
    rng = np.random.default_rng(3)
    f2 = _feats(rng.normal(size=(300, 24)))
    r2 = find_duplicates(f2, f2["label"], f2["ids"], k=5)
    assert r2.summary["n_groups"] == 0 and not r2.flagged.any() and (r2.columns["duplicate_group"] == -1).all()


def test_outlier_flags_planted_far_points():
    rng = np.random.default_rng(4)
    d = 32
    centres = rng.normal(size=(5, d)) * 4
    inl = centres[rng.integers(0, 5, 600)] + rng.normal(size=(600, d))
    far = rng.normal(size=(4, d)) * 4  # random directions: far from every cluster
    f = _feats(np.r_[inl, far])
    res = knn_outliers(f, k=10, c=6.0)
    assert np.flatnonzero(res.flagged).tolist() == [600, 601, 602, 603]
    assert res.summary["n_flagged"] == 4


def test_outlier_cut_is_a_quantile_of_the_val_images():
    """With a val split the cut is its (1 − fpr) quantile: clean training images pass at about that
    rate, far points are flagged, and issues.json states the rate and the reference."""
    rng = np.random.default_rng(9)
    d = 16
    centres = rng.normal(size=(8, d)) * 4
    n_tr, n_val = 3000, 600
    inl = centres[rng.integers(0, 8, n_tr + n_val)] + rng.normal(size=(n_tr + n_val, d))
    far = rng.normal(size=(6, d)) * 6
    split = ["train"] * n_tr + ["val"] * n_val + ["train"] * 6
    f = _feats(np.r_[inl, far], split)
    res = knn_outliers(f, k=10, fpr=0.01)
    pos = f["train_pos"]
    ref = _brute(np.r_[inl, far], pos, 10)[:, 9]
    cut = np.quantile(ref[n_tr:n_tr + n_val], 0.99)
    assert res.summary["cut"] == pytest.approx(cut, rel=2e-3) and res.summary["reference"] == "val"
    assert res.summary["fpr"] == 0.01 and res.summary["n_reference"] == n_val
    lo, hi = res.summary["fpr_interval"]
    assert lo < 0.01 < hi and res.summary["fpr_interval_level"] == 0.9 and f"{lo:.1%}–{hi:.1%}" in res.rule
    assert res.flagged[-6:].all()
    assert 0.002 <= res.flagged[:n_tr].mean() <= 0.025  # clean training images: ≈ the stated rate
    # the nearest training neighbour is named for the reviewer
    assert res.columns["outlier_neighbour"].shape == (len(pos),) and (res.columns["outlier_neighbour"] >= 0).all()


def test_outlier_score_is_the_mean_over_the_seed_models_of_the_kth_distance():
    """With the other seed models' embeddings (emb_1, emb_2: `clean score` with score.seed_embeddings) the
    score is the mean over the three models of each one's brute-force k-th distance, the cut the val images'
    (1 − fpr) quantile of the same mean; the named neighbour stays the scored model's."""
    rng = np.random.default_rng(11)
    n_tr, n_val, n_te, d = 700, 200, 100, 12
    m = n_tr + n_val + n_te
    split = np.array(["train"] * n_tr + ["val"] * n_val + ["test"] * n_te)
    base = rng.normal(size=(m, d))
    f = _feats(base, split)
    views = [base] + [base @ rng.normal(size=(d, d)) + 0.5 * rng.normal(size=(m, d)) for _ in range(2)]
    f["emb_1"], f["emb_2"] = (np.asarray(v, np.float16) for v in views[1:])
    pos = f["train_pos"]
    kth = np.mean([_brute(np.asarray(v, np.float16), pos, 10)[:, 9] for v in views], axis=0)
    res = knn_outliers(f, k=10, fpr=0.02)
    np.testing.assert_allclose(res.score, kth[pos], atol=3e-5)
    cut = np.quantile(kth[n_tr:n_tr + n_val], 0.98)
    assert res.summary["cut"] == pytest.approx(cut, abs=3e-5) and res.summary["models"] == 3
    np.testing.assert_array_equal(res.flagged, kth[pos] > res.summary["cut"])
    assert res.rule.startswith("mean over 3 seed models of the cosine distance to the 10-th nearest")
    first = knn.train_knn(f, 10)["rows"][pos, 0]
    np.testing.assert_array_equal(res.columns["outlier_neighbour"], f["ids"][first])
    # one model's embeddings: that model's distance, and the rule says nothing of seeds
    one = knn_outliers({k: v for k, v in f.items() if k not in ("emb_1", "emb_2", "_cache")}, k=10, fpr=0.02)
    np.testing.assert_allclose(one.score, _brute(np.asarray(base, np.float16), pos, 10)[pos, 9], atol=3e-5)
    assert one.summary["models"] == 1 and one.rule.startswith("cosine distance to the 10-th")


def test_knn_answers_only_the_asked_rows_and_does_not_cache_them():
    rng = np.random.default_rng(12)
    emb = rng.normal(size=(200, 8))
    split = np.where(np.arange(200) < 150, "train", np.where(np.arange(200) < 180, "val", "test"))
    f = _feats(emb, split)
    asked = split != "test"
    part = knn.train_knn(f, 4, queries=asked)
    full = knn.train_knn(f, 4)
    np.testing.assert_allclose(part["dist"][asked], full["dist"][asked], atol=1e-6)
    np.testing.assert_array_equal(part["rows"][asked], full["rows"][asked])
    assert np.isinf(part["dist"][~asked]).all() and (part["rows"][~asked] == -1).all()
    assert knn.train_knn(f, 4) is full  # the full answer is the cached one, not the partial


def test_embeddings_file_with_a_seed_embedding_of_the_wrong_length_is_refused(tmp_path):
    from pipeline.errors import CleanError
    from pipeline.rules.base import load_features

    f = _feats(np.ones((10, 3)))
    np.savez(tmp_path / "embeddings.npz", **{k: v for k, v in f.items() if k != "train_pos"},
             emb_1=np.ones((9, 3), np.float16))
    feats = load_features(tmp_path / "embeddings.npz", f["ids"])
    assert "emb_1" not in feats and knn.embedding_keys(feats) == ["emb", "emb_1"]  # read when the outlier check asks
    with pytest.raises(CleanError, match=r"embeddings.npz: 'emb_1' has shape \(9, 3\), not one row per id \(10\).*re-run `clean score`"):
        knn_outliers(feats, k=3)


def test_outlier_rate_interval_covers_the_true_rate():
    """outliers.rate_interval: over many val splits drawn from one distribution, the true fraction of new draws
    beyond each split's cut lies in the stated 90 % interval about 90 % of the time (or more: the interval is
    conservative between order statistics), for small and large val sets."""
    from pipeline.rules.outliers import rate_interval

    rng = np.random.default_rng(0)
    for n, fpr in ((180, 0.01), (600, 0.05), (75, 0.02)):
        lo, hi = rate_interval(n, fpr)
        cuts = np.quantile(rng.random((4000, n)), 1.0 - fpr, axis=1)  # uniform draws: the fraction beyond = 1 − cut
        covered = ((1.0 - cuts >= lo) & (1.0 - cuts <= hi)).mean()
        assert 0.88 <= covered <= 0.97, (n, fpr, covered)
        assert lo < fpr < hi


def _stats(n=50, **over):
    rng = np.random.default_rng(5)
    s = {"brightness_p05": np.zeros(n), "brightness_p99": rng.uniform(0.7, 1.0, n),
         "blur": rng.uniform(0.05, 0.08, n), "entropy": rng.uniform(4.0, 6.0, n),
         "colour_spread": np.zeros(n), "height": np.full(n, 28), "width": np.full(n, 28)}
    for k, (i, v) in over.items():
        s[k] = s[k].astype(float)
        s[k][i] = v
    return _feats(np.ones((n, 2)), **s)


@pytest.mark.parametrize("fn, planted", [
    (images.dark_issue, {"brightness_p99": 0.2}),
    (images.light_issue, {"brightness_p05": 0.97}),
    (images.blurry_issue, {"blur": 0.001}),
    (images.low_information_issue, {"entropy": 0.5, "brightness_p05": 0.5, "brightness_p99": 0.52}),
    (images.odd_size_issue, {"height": 80, "width": 80}),
    (images.odd_aspect_ratio_issue, {"width": 84}),
])
def test_image_property_flags_the_planted_image(fn, planted):
    clean = fn(_stats())
    assert not clean.flagged.any()
    res = fn(_stats(**{k: (7, v) for k, v in planted.items()}))
    assert np.flatnonzero(res.flagged).tolist() == [7]
    assert int(np.nanargmax(res.score)) == 7


def test_odd_size_both_ends_and_varied_sizes():
    f = _stats(height=([3, 9], [14, 60]), width=([3, 9], [14, 60]))
    assert np.flatnonzero(images.odd_size_issue(f).flagged).tolist() == [3, 9]
    # a set of varied sizes: nothing odd
    rng = np.random.default_rng(6)
    h = rng.integers(200, 400, 50)
    assert not images.odd_size_issue(_stats(height=(slice(None), h), width=(slice(None), h))).flagged.any()


def test_blurry_is_not_fooled_by_low_contrast():
    # a dark image: low Laplacian variance, but because its contrast is low too
    f = _stats(brightness_p99=(4, 0.25), blur=(4, 0.065 * 0.25 ** 2))
    assert not images.blurry_issue(f).flagged.any()
    # a blank grey image: no contrast at all → low-information, never blurry
    f = _stats(brightness_p05=(4, 0.5), brightness_p99=(4, 0.5), blur=(4, 0.0), entropy=(4, 0.0))
    assert not images.blurry_issue(f).flagged.any()
    assert images.low_information_issue(f).flagged.tolist() == [i == 4 for i in range(50)]
    # low entropy alone (a thin object on a black background) is not low information
    f = _stats(entropy=(4, 0.7))
    assert not images.low_information_issue(f).flagged.any()
    # a blank black image is dark (reported there), not also low-information
    f = _stats(brightness_p99=(4, 0.0), blur=(4, 0.0), entropy=(4, 0.0))
    assert not images.low_information_issue(f).flagged.any() and images.dark_issue(f).flagged[4]


def test_grayscale_only_in_a_colour_set():
    rng = np.random.default_rng(7)
    spread = rng.uniform(0.1, 0.4, 50)
    spread[[5, 6]] = 0.0
    assert np.flatnonzero(images.grayscale_issue(_stats(colour_spread=(slice(None), spread))).flagged).tolist() == [5, 6]
    # a 1-channel set (spread 0 everywhere) never flags
    assert not images.grayscale_issue(_stats()).flagged.any()


def test_issue_registry_entries_run_through_rule_inputs(tmp_path):
    """Every detector as the flag stage calls it: ISSUES[name].fn(RuleInputs, cfg) on embeddings.npz."""
    from pipeline.config import FlagConfig
    from pipeline.registry import ISSUES
    from pipeline.rules.base import RuleInputs

    f = _planted_dup_set()
    m = len(f["ids"])
    rng = np.random.default_rng(8)
    stats = {"brightness_p05": np.zeros(m), "brightness_p99": rng.uniform(0.7, 1, m), "blur": rng.uniform(0.05, 0.08, m),
             "entropy": rng.uniform(4, 6, m), "colour_spread": np.zeros(m), "height": np.full(m, 28),
             "width": np.full(m, 28)}
    np.savez(tmp_path / "embeddings.npz", **{k: v for k, v in f.items() if k != "train_pos"}, **stats)
    pos = f["train_pos"][::-1]  # scores.csv in another order than embeddings.npz
    scores = pd.DataFrame({"id": f["ids"][pos], "label": f["label"][pos]})
    inputs = RuleInputs(scores, tmp_path / "scores.csv")
    names = ["duplicate", "leakage", "outlier", "dark", "light", "blurry", "low_information", "odd_size", "odd_aspect_ratio",
             "grayscale"]
    for name in names:
        assert name in ISSUES
        res = ISSUES[name].fn(inputs, FlagConfig())
        assert res.flagged.shape == res.score.shape == (len(pos),) and res.flagged.dtype == bool
        assert res.rule
    dup = ISSUES["duplicate"].fn(inputs, FlagConfig())
    flagged_ids = set(scores["id"][dup.flagged])
    assert flagged_ids == {int(f["ids"][r]) for r in (200, 201, 202, 203)}
    assert set(dup.columns) == {"duplicate_group", "duplicate_of", "duplicate_conflict", "duplicate_leak", "duplicate_cut"}
    # each member's cut: the distance its nearest pair had to be under (0: the same pixels); none outside a set
    member = np.asarray(dup.columns["duplicate_group"]) >= 0
    cut = np.asarray(dup.columns["duplicate_cut"], float)
    assert np.isnan(cut[~member]).all() and (cut[member] >= 0).all()
    assert member.any() and (1.0 - dup.score[member] <= cut[member] + 1e-9).all()
    cut_of = dict(zip(scores["id"].tolist(), cut.tolist()))
    assert cut_of[2007] == 0.0 and cut_of[2017] > 0  # row 200 has row 0's pixels; row 201 is a near copy of row 1
    leak = ISSUES["leakage"].fn(inputs, FlagConfig())
    assert set(scores["id"][leak.flagged]) == {int(f["ids"][r]) for r in (3, 4)} and leak.summary["n_pairs"] == 2
    of = dict(zip(scores["id"].tolist(), leak.columns["leakage_of"].tolist()))
    assert of[37] == 2047 and of[47] == 2057 and of[27] == -1  # the val/test copy named per training image


def test_leaked_test_images_are_set_aside(tmp_path):
    """evaluate's set_aside leaves out the test images with a copy in train (issues.json leakage pairs)."""
    import json

    from pipeline.stages.evaluate import leaked_ids, set_aside

    pairs = [{"train_id": 3, "eval_id": 105, "split": "test", "distance": 0.0},
             {"train_id": 4, "eval_id": 107, "split": "test", "distance": 0.01},
             {"train_id": 9, "eval_id": 107, "split": "test", "distance": 0.02}]
    (tmp_path / "issues.json").write_text(json.dumps({"leakage": {"n": 3, "pairs": pairs}}))
    flags = tmp_path / "flags.csv"
    assert leaked_ids(flags).tolist() == [105, 107]
    ids = np.arange(100, 110)
    labels, keep, key = set_aside(ids, np.zeros(10, np.int64), flags)
    assert keep.tolist() == [i not in (105, 107) for i in ids] and key == "accuracy_unflagged"
    # no issues.json: nothing set aside, labels as given
    labels, keep, key = set_aside(ids, np.zeros(10, np.int64), tmp_path / "none" / "flags.csv")
    assert keep.all() and key is None


def test_why_names_the_statistic_the_cut_and_the_neighbour():
    from pipeline.views.why import why

    assert why({"id": 5, "duplicate_of": 3, "duplicate_score": 0.99, "duplicate_conflict": 1}, "duplicate", {}) == \
        "a copy of #3, the one kept (another label: a label conflict); distance 0.01"
    assert why({"id": 5, "duplicate_of": 3, "duplicate_score": 0.999, "duplicate_cut": 0.0015}, "duplicate",
               {"copy_ratio": 0.1, "d_exact": 0.001}) == ("a copy of #3, the one kept; aligned pixel distance 0.001 ≤ cut 0.0015 "
                                        "(0.1 × what the two see from their ordinary neighbours)")
    assert why({"id": 5, "duplicate_of": 3, "duplicate_score": 1.0, "duplicate_cut": 0.0}, "duplicate",
               {"copy_ratio": 0.1}) == "a copy of #3, the one kept; the same pixels"
    assert why({"id": 5, "duplicate_of": 3, "duplicate_score": 0.95, "duplicate_cut": 0.08}, "duplicate",
               {"method": "embedding"}) == "a copy of #3, the one kept; distance 0.05 < cut 0.08"
    assert why({"id": 5, "duplicate_of": 3, "duplicate_score": 0.9995, "duplicate_cut": 0.002}, "duplicate",
               {"copy_ratio": 0.1, "d_exact": 0.002}).endswith("≤ cut 0.002 (a re-encoded copy's, whatever the neighbours)")
    assert why({"id": 3, "duplicate_of": 3}, "duplicate", {}) == "the copy kept in its set"
    assert why({"id": 9, "leakage_of": 2047}, "leakage", {}) == "a copy of val/test image #2047"
    out = why({"id": 5, "outlier_score": 0.31, "outlier_neighbour": 12}, "outlier", {"cut": 0.25, "fpr": 0.01})
    assert out == "k-th neighbour distance 0.31 > cut 0.25, the 99.0% quantile of val images'; nearest training image #12"
    out = why({"id": 5, "outlier_score": 0.31, "outlier_neighbour": 12}, "outlier", {"cut": 0.25, "fpr": 0.01, "models": 3})
    assert out.startswith("k-th neighbour distance (mean of 3 seed models) 0.31 > cut 0.25")
    out = why({"id": 5, "blurry_stat": -2.5}, "blurry", {"cut": 0.29, "statistic": "log sharpness", "fpr_max": 0.01})
    assert out == "log sharpness = -2.5 < cut 0.29 (at most 1.0% of the set)"


def test_facts_line_rounds_floats_and_leaves_out_lists_and_the_rule():
    """`clean flag`'s table and the report show a detector's facts with floats at 4 significant digits."""
    from pipeline.views.why import facts_line

    facts = {"rule": "kNN", "n": 3, "examples": [1, 2], "seconds": 0.123456, "cut": 0.2756804543264329, "k": 10,
             "reference": "val", "fpr_interval": [0.002, 0.035], "exact": True, "fraction_flagged": 0.009581881533101045}
    assert facts_line(facts) == "cut 0.2757; k 10; reference val; exact True; fraction_flagged 0.009582"
    assert facts_line({}) == ""


def test_examples_line_gives_ids_and_the_members_of_a_set_of_copies():
    """`clean flag`'s "e.g. id" column: plain ids as they are, a duplicate set as its members (not a dict)."""
    from pipeline.views.why import examples_line

    assert examples_line([13479, 13478, 10042, 7]) == "13479, 13478, 10042"
    sets = [{"eval_ids": [], "group": 0, "labels": [0, 3], "train_ids": [2153, 6549]},
            {"eval_ids": [6551], "group": 1, "labels": [0, 3], "train_ids": [2198]}]
    assert examples_line(sets) == "2153/6549, 2198/6551"
    assert examples_line([]) == ""


@pytest.mark.parametrize("copies_first", [False, True])
def test_pixel_copies_survive_shift_flip_rotation_jpeg_and_brightness(copies_first):
    """Near copies verified on the thumbnails: each planted transformed copy lands in a set with its
    original, nothing else is grouped, and a copy filed under another class is the one flagged —
    whichever of a copy and its original comes first in the rows (the pairs are screened both ways)."""
    import io

    from PIL import Image, ImageEnhance

    from pipeline.scores.features import thumbnails

    rng = np.random.default_rng(11)
    n = 120
    # textured blobs: smooth random fields, masked to an ellipse (distinct 'objects' on black)
    yy, xx = np.mgrid[:28, :28]
    imgs = []
    for _ in range(n):
        f = np.asarray(Image.fromarray((rng.random((7, 7)) * 255).astype(np.uint8)).resize((28, 28), Image.BICUBIC), float)
        a, b = rng.uniform(8, 12, 2)
        mask = ((yy - 14) / a) ** 2 + ((xx - 14) / b) ** 2 <= 1
        imgs.append((f * mask).clip(0, 255).astype(np.uint8))

    def jpeg(x):
        buf = io.BytesIO()
        Image.fromarray(x).save(buf, "JPEG", quality=60)
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())))

    def shift(x):
        return np.asarray(Image.fromarray(x).transform((28, 28), Image.AFFINE, (1, 0, 2, 0, 1, -1), fillcolor=0))

    def crop(x):  # 83 % of the area, off centre, resized back
        return np.asarray(Image.fromarray(x).crop((1, 3, 26, 28)).resize((28, 28), Image.BILINEAR))

    planted = {0: shift, 1: lambda x: np.ascontiguousarray(x[:, ::-1]), 2: jpeg,
               3: lambda x: np.asarray(Image.fromarray(x).rotate(5, Image.BILINEAR, fillcolor=0)),
               5: crop, 6: lambda x: np.asarray(Image.fromarray(x).rotate(-8, Image.BILINEAR, fillcolor=0)),
               4: lambda x: np.asarray(ImageEnhance.Brightness(Image.fromarray(x)).enhance(1.2))}
    copies_ = [fn(imgs[i]) for i, fn in planted.items()]
    allimg = np.stack(imgs + copies_)[:, None]
    m = len(allimg)
    label = np.r_[rng.integers(0, 3, n), np.zeros(len(planted), int)]
    label[list(planted)] = 0
    last = n + len(planted) - 1
    label[last] = 2  # the brightened copy filed under another class: a conflict, and the flagged one
    emb = allimg.reshape(m, -1).astype(np.float32) + rng.normal(0, 1.0, (m, 784))
    # row order: as made, or reversed (each copy before its original)
    order = np.arange(m)[::-1] if copies_first else np.arange(m)
    row = np.argsort(order)  # row[i]: where image i sits
    f = _feats(emb[order], label=label[order])
    f["thumb"] = thumbnails(allimg[order])
    res = find_duplicates(f, f["label"], f["ids"], k=10, ratio=FlagConfig().copy_ratio)
    g = res.columns["duplicate_group"]
    sets = sorted(sorted(np.flatnonzero(g == gi).tolist()) for gi in np.unique(g[g >= 0]))
    assert sets == sorted(sorted([row[i], row[n + j]]) for j, i in enumerate(planted))
    assert res.flagged[row[last]] and not res.flagged[row[4]]  # the odd label is flagged, the original kept
    assert res.summary["method"] == "pixels"


def test_copy_views_sample_like_grid_sample_conventions():
    """The numpy bilinear sampler of rules/copies.py: the identity grid returns the image, a centre
    moved by one pixel shifts it by one pixel (zeros or the border pixel outside), and a mirrored
    pair in the screen scores exactly as the pair with b mirrored by hand."""
    from pipeline.rules import copies

    rng = np.random.default_rng(3)
    t = rng.random((3, 16, 16)).astype(np.float32)
    zero = np.zeros(3, np.float32)
    assert np.allclose(copies.canonical(t, centre=(zero, zero), zeros=True), t, atol=1e-6)
    one = np.full(3, 2.0 / 16, np.float32)  # one pixel to the right, in grid units
    moved = copies.canonical(t, centre=(zero, one), zeros=True)
    assert np.allclose(moved[:, :, :-1], t[:, :, 1:], atol=1e-6) and np.allclose(moved[:, :, -1], 0.0)
    border = copies.canonical(t, centre=(zero, one))
    assert np.allclose(border[:, :, -1], t[:, :, -1], atol=1e-6)
    # screen: the pair (0, 1) mirrored equals the pair (0, 2) where row 2 is row 1 mirrored
    thumb = (rng.random((3, 32 * 32)) * 255).astype(np.uint8)
    thumb[2] = thumb[1].reshape(32, 32)[:, ::-1].ravel()
    small, unit, _ = copies.row_views(thumb)
    d, v, mirrored = copies.screen(small, unit, np.array([0, 0]), np.array([1, 2]))
    assert abs(d[0] - d[1]) < 1e-5
    assert mirrored[0] != mirrored[1]  # the screen chose the mirror: one pair plain, the other mirrored
    assert copies.VIEWS[v[0]] == copies.VIEWS[v[1]]


def test_view_descriptors_are_the_sampled_views_and_find_a_rotated_copy():
    """copies.view_descriptors: each view's operator product equals copies.canonical of the view
    (centre at 0, zero fill) — the reference, sample by sample; and an image rotated by 6° is nearer
    its original by the best view's descriptor than by the canonical descriptor alone."""
    from PIL import Image

    from pipeline.rules import copies

    rng = np.random.default_rng(11)
    c = copies.COARSE_SIDE
    v = rng.random((4, c, c)).astype(np.float32)
    zero = np.zeros(4, np.float32)
    for ang, zoom in copies.VIEWS[1:]:
        ref = copies.canonical(v, angle=ang, zoom=zoom, centre=(zero, zero), zeros=True).reshape(4, -1)
        got = v.reshape(4, -1) @ copies._view_operator(c, ang, zoom)
        assert np.allclose(got, ref, atol=1e-5)
    # a textured image (8 × 8 random cells, bilinear to 32 × 32) and its copy rotated by 6° about the centre
    img = np.asarray(Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8)).resize((32, 32), Image.BILINEAR))
    rot = np.asarray(Image.fromarray(img).rotate(6.0, Image.BILINEAR, fillcolor=0))
    _, unit, _ = copies.row_views(np.stack([img.ravel(), rot.ravel()]))
    d0, d0f = copies.descriptor(unit)
    views = copies.view_descriptors(unit)
    # the views' descriptors: descriptor() of the re-sampled canonical views
    for k, (ang, zoom) in enumerate(copies.VIEWS[1:]):
        sampled = copies._unit(unit @ copies._view_operator(copies.COARSE_SIDE, ang, zoom))
        np.testing.assert_allclose(views[:, k], copies.descriptor(sampled)[0], atol=1e-5)
    plain = 1.0 - float(d0[0] @ d0[1])
    best = float(copies._nearest_view(d0, d0f, views, np.array([0]), np.array([1]))[0])
    # from either end: a's descriptors against b's views, and b's against a's
    ref = [plain, 1.0 - float(d0f[0] @ d0[1])]
    for x, y in ((0, 1), (1, 0)):
        ref += [1.0 - float(d0[x] @ v) for v in views[y]] + [1.0 - float(d0f[x] @ v) for v in views[y]]
    assert best == pytest.approx(min(ref), abs=1e-6)
    assert float(copies._nearest_view(d0, d0f, views, np.array([1]), np.array([0]))[0]) == pytest.approx(best, abs=1e-6)
    assert best < 0.5 * plain


def _transformed_pair(angle: float, zoom: float, ty: float, tx: float, p: int = 6, s: int = 16):
    """p smooth images a [p, s, s] (content fading out inside the border) and b = 1.3 · a seen through
    the similarity transform (angle degrees, zoom, move (ty, tx) grid units) + 0.05, so that
    b(A x + t) = a(x) → (a's canonical view, its mask, b, the true transform [p, 4], the identity [p, 4])."""
    from PIL import Image

    from pipeline.rules import copies

    rng = np.random.default_rng(5)
    smooth = np.stack([np.asarray(Image.fromarray((rng.random((5, 5)) * 255).astype(np.uint8)).resize(
        (s, s), Image.BICUBIC), np.float32) / 255 for _ in range(p)])
    c = (2.0 * np.arange(s) + 1.0) / s - 1.0
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    a = smooth * np.exp(-((r2 / 0.45) ** 2)).astype(np.float32)
    ang = np.deg2rad(angle)
    truth = np.tile(np.array([np.cos(ang) / zoom, np.sin(ang) / zoom, tx, ty], np.float32), (p, 1))
    inv = np.linalg.inv(np.array([[truth[0, 0], -truth[0, 1]], [truth[0, 1], truth[0, 0]]]))  # b(u) = a(A⁻¹(u − t))
    uy, ux = np.meshgrid(c, c, indexing="ij")
    src = np.einsum("ij,jyx->iyx", inv, np.stack([ux - tx, uy - ty]))
    gx, gy = (np.broadcast_to(v, (p, s, s)).astype(np.float32) for v in src)
    b = 1.3 * copies._sample(a, gx, gy, True) + 0.05
    va, ma = copies.canonical(a, mask=True, centre=(np.zeros(p, np.float32), np.zeros(p, np.float32)))
    return va, ma, b, truth, np.tile(np.array([1.0, 0.0, 0.0, 0.0], np.float32), (p, 1))


def test_align_recovers_a_known_similarity_transform():
    """copies.align: b = a zoomed ×1.1, rotated 4° and moved (plus gain 1.3, offset 0.05); from the
    identity, a few Gauss–Newton steps find the transform (reference: the one used to make b) and the
    masked correlation distance falls from 0.05–0.1 to that of the true transform."""
    from pipeline.rules import copies

    va, ma, b, truth, start = _transformed_pair(4.0, 1.1, 0.06, -0.08)

    def dist(q):
        vb, mb = copies._warp(b, q)
        return 1.0 - copies._masked_ncc(va, vb, ma * mb)

    q = copies.align(va, ma, b, start, steps=8)
    assert np.all(dist(start) > 0.04)
    assert np.all(dist(q) <= dist(truth) + 1e-3)  # as close as the true transform (bilinear resampling twice)
    assert np.allclose(q, truth, atol=0.02)


def test_align_keeps_its_start_beyond_a_copys_zoom():
    """copies.align: b = a zoomed ×1.6 (beyond ALIGN_MAX_ZOOM, not a copy's transform) — unbounded, the
    fit follows it; bounded, align returns its start. An empty batch comes back empty."""
    from pipeline.rules import copies

    va, ma, b, _, start = _transformed_pair(0.0, 1.6, 0.0, 0.0)
    assert np.array_equal(copies.align(va, ma, b, start, steps=8), start)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(copies, "ALIGN_MAX_ZOOM", 1e9)
        free = copies.align(va, ma, b, start, steps=8)
    assert np.all(np.hypot(free[:, 0], free[:, 1]) < 1 / 1.25)
    assert copies.align(va[:0], ma[:0], b[:0], start[:0]).shape == (0, 4)


def test_second_look_brings_a_crop_close_and_leaves_another_image_far():
    """copies.second_look: one alignment step takes an off-centre 83 % crop (resized back) of an image
    much closer to it than the screen's fixed views do, and leaves a different image far away."""
    from PIL import Image

    from pipeline.rules import copies
    from pipeline.scores.features import thumbnails

    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:28, :28]
    mask = ((yy - 14) / 11) ** 2 + ((xx - 14) / 9) ** 2 <= 1

    def blob():
        f = np.asarray(Image.fromarray((rng.random((7, 7)) * 255).astype(np.uint8)).resize((28, 28), Image.BICUBIC), float)
        return (f * mask).clip(0, 255).astype(np.uint8)

    a, other = blob(), blob()
    crop = np.asarray(Image.fromarray(a).crop((1, 3, 26, 28)).resize((28, 28), Image.BILINEAR))
    small, unit, _ = copies.row_views(thumbnails(np.stack([a, crop, other])[:, None]))
    pa, pb = np.array([0, 0]), np.array([1, 2])
    d1, view, flip = copies.screen(small, unit, pa, pb)
    d2 = copies.second_look(small, pa, pb, flip, view)
    assert d2[0] < 0.5 * d1[0]  # the crop, aligned: far closer than in the best fixed view
    assert d2[0] < 0.1 * d2[1]  # and far closer than another image after the same step


def test_a_pair_is_never_its_own_reference():
    """copies._row_ref: a pair that is one row's REF_RANK-th (its reference) and the other row's
    nearest is measured against the other row's reference only, not against its own distance."""
    from pipeline.rules import copies

    r = copies.REF_RANK
    a, b = np.array([0, 0, 1]), np.array([1, 2, 3])
    ra, rb = np.array([0, r, 0]), np.array([r, 1, r])
    d = np.array([0.01, 0.5, 0.2])
    ref = copies._row_ref(4, a, b, ra, rb, d)
    # pair (0, 1) is row 1's reference: its own 0.01 is left out, row 0's reference (0, 2) = 0.5 counts
    assert ref[0] == pytest.approx(0.5)
    # pair (0, 2) is row 0's reference; row 2 has none: no reference at all
    assert np.isnan(ref[1])
    # pair (1, 3) is row 3's reference; row 1's reference is (0, 1) = 0.01
    assert ref[2] == pytest.approx(0.01)


def test_candidates_ask_in_each_query_view():
    """copies.candidates: each further query key adds its row's nearest training row (self excluded),
    k_view + 1 of them; a query nearest to its own row adds nothing."""
    from pipeline.rules import copies

    rng = np.random.default_rng(3)
    key = rng.normal(size=(12, 8)).astype(np.float32)
    key /= np.linalg.norm(key, axis=1, keepdims=True)
    pos = np.arange(12)
    q = key.copy()
    q[0] = key[5]  # row 0 seen in another view looks like row 5
    a0, b0, _ = copies.candidates(key, pos, 1, exact_max=100, seed=0)
    a1, b1, _ = copies.candidates(key, pos, 1, exact_max=100, seed=0, queries=[q])
    extra = sorted(set(zip(a1.tolist(), b1.tolist())) - set(zip(a0.tolist(), b0.tolist())))
    assert len(a1) == len(a0) + 1 and (0, 5) in set(zip(a1.tolist(), b1.tolist()))
    assert extra in ([], [(0, 5)])  # (0, 5) may already be row 0's nearest by its own key
    assert all(x != y for x, y in zip(a1, b1))


def test_rank_in_row_matches_lexsort():
    """copies._rank_in_row (one stable sort of a combined key) against np.lexsort, ties included."""
    from pipeline.rules import copies

    rng = np.random.default_rng(4)
    rows = rng.integers(0, 300, 5000)
    key = rng.random(5000).astype(np.float32) * 2.0
    key[::9] = key[3]  # ties within rows
    o = np.lexsort((key, rows))
    r = rows[o]
    start = np.r_[0, np.flatnonzero(r[1:] != r[:-1]) + 1]
    ref = np.empty(len(r), np.int64)
    ref[o] = np.arange(len(r)) - np.repeat(start, np.diff(np.r_[start, len(r)]))
    assert np.array_equal(copies._rank_in_row(rows, key), ref)
    assert copies._rank_in_row(np.zeros(0, np.int64), np.zeros(0, np.float32)).shape == (0,)


def _bilinear_reference(t, gx, gy, zeros):
    """Bilinear sampling, one sample point at a time (align_corners=False units; outside: 0 or the nearest border pixel)."""
    n, s = t.shape[0], t.shape[-1]
    out = np.zeros(gx.shape, np.float64)
    for i, y, x in itertools.product(range(n), range(gx.shape[1]), range(gx.shape[2])):
        px, py = (gx[i, y, x] + 1) * s / 2 - 0.5, (gy[i, y, x] + 1) * s / 2 - 0.5
        if not zeros:
            px, py = min(max(px, 0.0), s - 1.0), min(max(py, 0.0), s - 1.0)
        x0, y0 = int(np.floor(px)), int(np.floor(py))
        v = 0.0
        for yy, xx in itertools.product((y0, y0 + 1), (x0, x0 + 1)):
            w = (1 - abs(px - xx)) * (1 - abs(py - yy))
            if 0 <= yy < s and 0 <= xx < s:
                v += w * t[i, yy, xx]
        out[i, y, x] = v
    return out


def test_sampler_equals_a_pointwise_bilinear_reference():
    """copies._sample (F.grid_sample, all rows at once) against bilinear sampling one point at a time: moves,
    rotations and zooms, points far outside the image, zero fill and border fill; no rows → no rows."""
    from pipeline.rules import copies

    rng = np.random.default_rng(6)
    s = 8
    t = rng.random((12, s, s)).astype(np.float32)
    for scale in (0.05, 0.5, 3.0):
        g = copies._view_grid(s, float(rng.uniform(-10, 10)), float(rng.uniform(0.8, 1.2)))
        cy, cx = (rng.normal(size=(2, 12)) * scale).astype(np.float32)
        gx, gy = g[None, :, :, 0] + cx[:, None, None], g[None, :, :, 1] + cy[:, None, None]
        for zeros in (True, False):
            got = copies._sample(t, gx, gy, zeros)
            assert got.dtype == np.float32 and got.shape == (12, s, s)
            assert np.allclose(got, _bilinear_reference(t, gx, gy, zeros), atol=1e-5)
    assert copies._sample(t[:0], gx[:0], gy[:0], True).shape == (0, s, s)


def test_chunks_on_threads_give_the_one_thread_result(monkeypatch):
    """pool.each_chunk: every chunk once, on several threads or one (OMP_NUM_THREADS=1); the copy search's
    stages give the same numbers either way."""
    from pipeline.data import pool
    from pipeline.rules import copies

    import torch

    monkeypatch.setattr(pool, "threads", lambda: 3)
    seen, torch_threads, before = [], set(), torch.get_num_threads()
    pool.each_chunk(lambda lo, hi: (seen.append((lo, hi)), torch_threads.add(torch.get_num_threads())), 10, 3)
    assert sorted(seen) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert torch_threads == {1} and torch.get_num_threads() == before  # one torch thread per chunk, then restored
    with pytest.raises(ValueError, match="chunk 3"):
        pool.each_chunk(lambda lo, hi: (_ for _ in ()).throw(ValueError(f"chunk {lo}")) if lo == 3 else None, 10, 3)
    rng = np.random.default_rng(2)
    thumb = (rng.random((300, 16 * 16)) * 255).astype(np.uint8)
    a, b = rng.integers(0, 300, 500), rng.integers(0, 300, 500)
    many = copies.row_views(thumb, chunk=7), copies.screen(*copies.row_views(thumb)[:2], a, b, chunk=5)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(pool, "threads", lambda: 1)
    one = copies.row_views(thumb, chunk=7), copies.screen(*copies.row_views(thumb)[:2], a, b, chunk=5)
    for x, y in zip(many, one):
        for u, v in zip(x, y):
            assert np.array_equal(u, v)


def test_thread_count_follows_omp_num_threads(monkeypatch):
    """Array work uses no more threads than OMP_NUM_THREADS where that is set, else the CPUs (at most 8)."""
    from pipeline.data import pool

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert pool.threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert pool.threads() == min(8, len(os.sched_getaffinity(0)))


def test_eval_members_come_from_the_leakage_pairs_and_the_example_sets():
    """views.sets.eval_members: every set's val/test ids, from issues.json's leakage pairs (all of them, not
    only the example sets') and its example sets; a pair whose training id is in no set is left out."""
    from pipeline.views.sets import eval_members

    facts = {"examples": [{"group": 0, "train_ids": [7], "eval_ids": [900]}],
             "leakage": {"pairs": [{"train_id": 7, "eval_id": 901}, {"train_id": 17, "eval_id": 905},
                                   {"train_id": 99, "eval_id": 950}],
                         "examples": [{"group": 0, "train_ids": [7], "eval_ids": [901]}]},
             "conflicts": {"examples": [{"group": 3, "train_ids": [27], "eval_ids": []}]}}
    assert eval_members(facts, {7: 0, 17: 12, 27: 3}) == {0: [900, 901], 12: [905]}
    assert eval_members(None, {7: 0}) == {} and eval_members({"leakage": None}, {}) == {}
    bad = {"leakage": {"pairs": [{"train_id": 7}, {"train_id": "x", "eval_id": 3}, None, {"train_id": 7, "eval_id": 902}]},
           "examples": [None, {"group": "g"}, {"group": 0, "eval_ids": None}]}
    assert eval_members(bad, {7: 0}) == {0: [902]}  # a hand-edited file: malformed entries skipped
