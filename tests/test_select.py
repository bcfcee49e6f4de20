"""Tests for pipeline.strategies: every strategy on hand-made scores with exact kept sets."""
from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

from pipeline.errors import CleanError
from pipeline.strategies import (
    STRATEGIES,
    class_quotas,
    label_entropy,
    n_keep_for,
    select,
    summary,
)

# 10 samples; descending order of scores: 3(9.0) 7(8.0) 0(5.0) 5(5.0) 9(4.0) 2(3.0) 8(2.5) 1(1.0) 6(0.5) 4(0.0)
SCORES = np.array([5.0, 1.0, 3.0, 9.0, 0.0, 5.0, 0.5, 8.0, 2.5, 4.0])
LABELS = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])


def sel(strategy, keep, **kw):
    kw.setdefault("seed", 0)
    return select(SCORES, LABELS, strategy, keep, **kw).tolist()


# --------------------------------------------------------------------------- n_keep


@pytest.mark.parametrize(
    "keep,n,expected",
    [(0.3, 10, 3), (1.0, 10, 10), (0.01, 10, 1), (0.25, 10, 2), (0.35, 10, 4), (0.999, 10, 10)],
)
def test_n_keep(keep, n, expected):
    # Python round: 2.5 -> 2, 3.5 -> 4 (halves to even); clipped to [1, N]
    assert n_keep_for(keep, n) == expected


# --------------------------------------------------------------------------- random


def test_random_deterministic_size_unique_sorted():
    a = select(SCORES, LABELS, "random", 0.5, seed=7)
    b = select(SCORES, LABELS, "random", 0.5, seed=7)
    assert a.tolist() == b.tolist()
    assert a.size == 5 and np.unique(a).size == 5
    assert a.tolist() == sorted(a.tolist())
    assert a.dtype == np.int64
    expected = np.sort(np.random.default_rng(7).choice(10, size=5, replace=False))
    assert a.tolist() == expected.tolist()
    # different seeds give different subsets (for at least one of a few seeds)
    assert any(select(SCORES, LABELS, "random", 0.5, seed=s).tolist() != a.tolist() for s in range(1, 5))


def test_random_ignores_nan_scores():
    s = SCORES.copy()
    s[0] = np.nan
    assert select(s, LABELS, "random", 0.3, seed=1).size == 3


# --------------------------------------------------------------------------- max-gradient


def test_max_gradient_exact():
    assert sel("max-gradient", 0.3) == [0, 3, 7]
    assert sel("max-gradient", 0.1) == [3]
    assert sel("max-gradient", 1.0) == list(range(10))


def test_max_gradient_ties_broken_by_index():
    # ranks 3 and 4 are tied (0 and 5 both score 5.0): the lower index wins
    assert sel("max-gradient", 0.3) == [0, 3, 7]
    s = np.array([1.0, 2.0, 2.0, 2.0, 0.0])
    assert select(s, np.zeros(5, int), "max-gradient", 0.4, seed=0).tolist() == [1, 2]


def test_max_gradient_seed_independent():
    assert sel("max-gradient", 0.5, seed=0) == sel("max-gradient", 0.5, seed=123)


# --------------------------------------------------------------------------- non-extreme


def test_non_extreme_skip():
    # skip round(0.2*10)=2 (samples 3, 7), keep next 3 in order: 0, 5, 9
    assert sel("non-extreme", 0.3, skip=0.2) == [0, 5, 9]
    # default skip 0.05 -> round(0.5) = 0 at N=10: same as max-gradient
    assert sel("non-extreme", 0.3) == [0, 3, 7]
    # skip 0.1 -> 1 skipped (sample 3)
    assert sel("non-extreme", 0.3, skip=0.1) == [0, 5, 7]


def test_non_extreme_shortfall_taken_from_skipped_near_boundary():
    # skip 3 (3, 7, 0), keep 9: 7 remain, the 2 missing come from the skipped ones closest
    # to the boundary (0 and 7) -> only the very top (3) is dropped
    assert sel("non-extreme", 0.9, skip=0.3) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert sel("non-extreme", 1.0, skip=0.3) == list(range(10))


def test_non_extreme_large_n():
    rng = np.random.default_rng(0)
    s = rng.permutation(1000).astype(float)  # sample i has score s[i], all distinct
    kept = select(s, np.zeros(1000, int), "non-extreme", 0.1, seed=0, skip=0.05)
    # skip the 50 largest scores (999..950), keep the next 100 (949..850)
    assert sorted(s[kept].tolist()) == list(map(float, range(850, 950)))


# --------------------------------------------------------------------------- gradient-cdf


def test_gradient_cdf_frequencies_proportional():
    g = np.array([1.0, 2.0, 3.0, 4.0, 0.0])
    y = np.zeros(5, int)
    draws = 20_000
    counts = Counter()
    for seed in range(draws):
        (i,) = select(g, y, "gradient-cdf", 0.2, seed=seed).tolist()  # n_keep = 1
        counts[i] += 1
    assert counts[4] == 0  # zero weight never picked
    freq = np.array([counts[i] / draws for i in range(5)])
    expected = g / g.sum()
    # std of a frequency at p=0.4, n=20k is 0.0035; 0.015 is > 4 sigma
    np.testing.assert_allclose(freq, expected, atol=0.015)


def test_gradient_cdf_pairs_follow_successive_sampling():
    # n_keep=2 from weights p: P({i,j}) = p_i p_j/(1-p_i) + p_j p_i/(1-p_j)
    g = np.array([1.0, 2.0, 3.0, 4.0])
    p = g / g.sum()
    y = np.zeros(4, int)
    draws = 10_000
    counts = Counter()
    for seed in range(draws):
        kept = select(g, y, "gradient-cdf", 0.5, seed=seed).tolist()
        assert len(kept) == 2 and kept[0] != kept[1]  # no replacement
        counts[tuple(kept)] += 1
    for i in range(4):
        for j in range(i + 1, 4):
            want = p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j])
            assert abs(counts[(i, j)] / draws - want) < 0.02, (i, j)


def test_gradient_cdf_no_replacement_and_zero_fill():
    g = np.array([0.0, 5.0, 0.0, 1.0, 0.0, 2.0])
    y = np.zeros(6, int)
    for seed in range(50):
        # 3 positives, keep 3: exactly the positives
        assert select(g, y, "gradient-cdf", 0.5, seed=seed).tolist() == [1, 3, 5]
        # keep 5: all 3 positives + 2 distinct zeros
        kept = select(g, y, "gradient-cdf", 5 / 6, seed=seed)
        assert kept.size == 5 and np.unique(kept).size == 5
        assert {1, 3, 5} <= set(kept.tolist())
    # all-zero scores: uniform fill, still no replacement
    kept = select(np.zeros(6), y, "gradient-cdf", 0.5, seed=3)
    assert kept.size == 3 and np.unique(kept).size == 3


def test_gradient_cdf_deterministic():
    a = sel("gradient-cdf", 0.5, seed=11)
    assert a == sel("gradient-cdf", 0.5, seed=11)
    assert len(a) == 5 and len(set(a)) == 5


def test_gradient_cdf_bad_scores():
    s = SCORES.copy()
    s[2] = -1.0
    with pytest.raises(CleanError, match=r"^strategy 'gradient-cdf' needs scores >= 0"):
        select(s, LABELS, "gradient-cdf", 0.5, seed=0)
    s[2] = np.inf
    with pytest.raises(CleanError) as e:
        select(s, LABELS, "gradient-cdf", 0.5, seed=0)
    assert str(e.value) == "strategy 'gradient-cdf' needs finite scores; 1 are NaN/inf"


# --------------------------------------------------------------------------- drop-flagged


def test_drop_flagged():
    flagged = np.array([0, 1, 0, 0, 1, 0, 0, 1, 0, 0], dtype=bool)
    assert sel("drop-flagged", 0.1, flagged=flagged) == [0, 2, 3, 5, 6, 8, 9]
    # keep, seed and balanced are ignored
    assert sel("drop-flagged", 1.0, flagged=flagged, seed=5, balanced=True) == [0, 2, 3, 5, 6, 8, 9]
    # 0/1 ints accepted
    assert sel("drop-flagged", 0.5, flagged=flagged.astype(int)) == [0, 2, 3, 5, 6, 8, 9]


def test_drop_flagged_errors():
    with pytest.raises(CleanError) as e:
        sel("drop-flagged", 0.5)
    assert str(e.value) == (
        "prune.strategy 'drop-flagged' needs the flag stage's output (flagged); "
        "run `clean flag` first or choose another strategy"
    )
    with pytest.raises(CleanError) as e:
        sel("drop-flagged", 0.5, flagged=np.ones(10, bool))
    assert str(e.value) == "drop-flagged would keep 0 of 10 samples: every sample is flagged"
    with pytest.raises(CleanError) as e:
        sel("drop-flagged", 0.5, flagged=np.zeros(9, bool))
    assert str(e.value) == "flagged must be a 1-D array [N] with N = 10, got shape (9,)"


# --------------------------------------------------------------------------- balanced


def test_class_quotas_largest_remainder():
    assert class_quotas([50, 30, 20], 10).tolist() == [5, 3, 2]
    # 7 * [5, 3, 2] / 10 = [3.5, 2.1, 1.4] -> floors [3, 2, 1] (6), +1 to remainder .5
    assert class_quotas([5, 3, 2], 7).tolist() == [4, 2, 1]
    # equal remainders: smaller class index first; 2 * [1,1,1]/3 = .667 each -> [1, 1, 0]
    assert class_quotas([1, 1, 1], 2).tolist() == [1, 1, 0]
    for counts in ([7, 1, 13, 4], [100, 1, 1], [3, 3, 3, 3, 3]):
        for k in range(1, sum(counts) + 1):
            q = class_quotas(counts, k)
            assert q.sum() == k and (q <= np.array(counts)).all() and (q >= 0).all()


def test_balanced_max_gradient_per_class():
    # class 0: {0:5, 2:3, 4:0, 6:.5, 8:2.5}; class 1: {1:1, 3:9, 5:5, 7:8, 9:4}
    # keep 4 -> quotas [2, 2]: class 0 top-2 = 0, 2; class 1 top-2 = 3, 7
    assert sel("max-gradient", 0.4, balanced=True) == [0, 2, 3, 7]
    # unbalanced would be skewed: 3, 7, 0, 5 -> three from class 1
    assert sel("max-gradient", 0.4) == [0, 3, 5, 7]


def test_balanced_non_extreme_skips_within_class():
    # skip round(0.2*5)=1 per class: class 0 skips 0 -> keeps 2, 8; class 1 skips 3 -> keeps 7, 5
    assert sel("non-extreme", 0.4, balanced=True, skip=0.2) == [2, 5, 7, 8]


def test_balanced_quotas_sum_exactly():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2, 5], [37, 11, 50, 2])  # 100 samples, class ids need not be contiguous
    scores = rng.random(100)
    for strategy in ("random", "max-gradient", "non-extreme", "gradient-cdf"):
        for keep in (0.01, 0.13, 0.5, 0.77, 1.0):
            kept = select(scores, labels, strategy, keep, seed=3, balanced=True)
            n_keep = n_keep_for(keep, 100)
            assert kept.size == n_keep and np.unique(kept).size == n_keep
            got = np.array([np.count_nonzero(labels[kept] == c) for c in (0, 1, 2, 5)])
            assert got.tolist() == class_quotas([37, 11, 50, 2], n_keep).tolist()


def test_balanced_random_deterministic_per_class_seed():
    labels = np.repeat([0, 1], 50)
    s = np.zeros(100)
    a = select(s, labels, "random", 0.3, seed=9, balanced=True)
    assert a.tolist() == select(s, labels, "random", 0.3, seed=9, balanced=True).tolist()
    exp0 = np.random.default_rng([9, 0]).choice(50, 15, replace=False)
    exp1 = 50 + np.random.default_rng([9, 1]).choice(50, 15, replace=False)
    assert a.tolist() == sorted(exp0.tolist() + exp1.tolist())


# --------------------------------------------------------------------------- bad params


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(strategy="top-k", keep=0.5),
         f"prune.strategy must be one of: {', '.join(STRATEGIES.names())}; got 'top-k'"),
        (dict(strategy="random", keep=1.5), "prune.keep must be in (0, 1], got 1.5"),
        (dict(strategy="random", keep=0), "prune.keep must be in (0, 1], got 0"),
        (dict(strategy="random", keep=float("nan")), "prune.keep must be in (0, 1], got nan"),
        (dict(strategy="random", keep="half"), "prune.keep must be a number, got 'half'"),
        (dict(strategy="non-extreme", keep=0.5, skip=1.0), "prune.skip must be in [0, 1), got 1.0"),
        (dict(strategy="non-extreme", keep=0.5, skip=-0.1), "prune.skip must be in [0, 1), got -0.1"),
        (dict(strategy="random", keep=0.5, seed=-1), "seed must be a non-negative integer, got -1"),
        (dict(strategy="random", keep=0.5, seed=1.5), "seed must be a non-negative integer, got 1.5"),
    ],
)
def test_bad_params(kw, msg):
    kw.setdefault("seed", 0)
    with pytest.raises(CleanError) as e:
        select(SCORES, LABELS, **kw)
    assert str(e.value) == msg


def test_bad_shapes():
    with pytest.raises(CleanError) as e:
        select(SCORES, LABELS[:5], "random", 0.5, seed=0)
    assert str(e.value) == "labels has 5 entries but scores has 10; they must match"
    with pytest.raises(CleanError) as e:
        select(np.array([]), np.array([], int), "random", 0.5, seed=0)
    assert str(e.value) == "nothing to select from: the score vector is empty"
    with pytest.raises(CleanError) as e:
        select(SCORES.reshape(2, 5), LABELS, "random", 0.5, seed=0)
    assert str(e.value) == "scores must be a 1-D array [N], got shape (2, 5)"
    s = SCORES.copy()
    s[1] = np.nan
    with pytest.raises(CleanError) as e:
        select(s, LABELS, "max-gradient", 0.5, seed=0)
    assert str(e.value) == "strategy 'max-gradient' needs finite scores; 1 are NaN/inf"


def test_strategies_constant():
    # the paper's strategies first, then the remedies (the registry grows, it never reorders)
    assert tuple(STRATEGIES.names()[:5]) == ("random", "max-gradient", "non-extreme", "gradient-cdf", "drop-flagged")


# --------------------------------------------------------------------------- summaries


def test_label_entropy():
    h, u = label_entropy([0, 0, 1, 1], 4)
    assert h == pytest.approx(math.log(2)) and u == pytest.approx(math.log(4))
    assert label_entropy([2, 2, 2], 3) == (0.0, pytest.approx(math.log(3)))
    assert label_entropy(np.arange(5), 5)[0] == pytest.approx(math.log(5))
    assert label_entropy(np.array([], int), 3)[0] == 0.0
    with pytest.raises(CleanError) as e:
        label_entropy([0, 3], 3)
    assert str(e.value) == "labels must be in [0, 3), got max 3"


def test_summary():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    out = summary(labels, np.array([0, 1, 4]), 4, ["cat", "dog", "emu", "fox"])
    assert out["n_total"] == 8 and out["n_kept"] == 3
    assert out["fraction_kept"] == pytest.approx(3 / 8)
    assert out["kept_per_class"] == {"cat": 2, "dog": 1, "emu": 0, "fox": 0}
    assert out["fraction_kept_per_class"] == {"cat": 0.5, "dog": 0.5, "emu": 0.0, "fox": None}
    assert out["per_class"][0] == {"class": 0, "name": "cat", "n_total": 4, "n_kept": 2, "fraction_kept": 0.5}
    ent = out["label_entropy"]
    p_all = np.array([4, 2, 2]) / 8
    assert ent["all"] == pytest.approx(float(-(p_all * np.log(p_all)).sum()))
    assert ent["kept"] == pytest.approx(float(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))))
    assert ent["uniform"] == pytest.approx(math.log(4))
    json.dumps(out)  # serialisable
    assert summary(labels, np.array([], int), 3)["kept_per_class"] == {"0": 0, "1": 0, "2": 0}


def test_summary_errors():
    labels = np.array([0, 1, 1])
    with pytest.raises(CleanError) as e:
        summary(labels, np.array([0, 0]), 2, ["a", "b"])
    assert str(e.value) == "kept_idx contains duplicate indices"
    with pytest.raises(CleanError) as e:
        summary(labels, np.array([3]), 2, ["a", "b"])
    assert str(e.value) == "kept_idx must be integer indices in [0, 3)"
    with pytest.raises(CleanError) as e:
        summary(labels, np.array([0]), 2, ["a"])
    assert str(e.value) == "class_names has 1 names but num_classes is 2"
