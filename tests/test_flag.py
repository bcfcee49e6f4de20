"""Tests for pipeline/rules/: each rule on data with planted outliers, plus bad params."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import CleanError
from pipeline.rules.base import FlagResult
from pipeline.rules.confident import flag_confident
from pipeline.rules.metrics import auroc, precision_recall
from pipeline.rules.outliers import flag_isolation_forest
from pipeline.rules.threshold import flag_mad, flag_quantile


@pytest.fixture(scope="module")
def planted():
    """500 N(0,1) inliers + 10 outliers at 8 sigma, shuffled. Returns (values, truth)."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(500), np.full(10, 8.0) + rng.uniform(0, 0.5, 10)])
    truth = np.zeros(510, bool)
    truth[500:] = True
    perm = rng.permutation(510)
    return x[perm], truth[perm]


# --------------------------------------------------------------------------- quantile


def test_quantile_count_and_rule():
    v = np.arange(100, dtype=float)  # no ties
    r = flag_quantile(v, 0.05, "loss")
    assert isinstance(r, FlagResult)
    assert r.flagged.dtype == bool and r.flagged.shape == (100,)
    assert np.flatnonzero(r.flagged).tolist() == [95, 96, 97, 98, 99]
    assert r.rule == "loss >= q0.95 (95)"
    np.testing.assert_array_equal(r.value, v)
    assert r.n_flagged == 5


@pytest.mark.parametrize("q,n,expected", [(0.07, 100, 7), (0.05, 510, 26), (0.001, 50, 1), (0.5, 3, 2), (0.99, 10, 10)])
def test_quantile_ceil_count(q, n, expected):
    v = np.random.default_rng(1).permutation(n).astype(float)
    assert flag_quantile(v, q, "s").n_flagged == expected


def test_quantile_ties_all_flagged_deterministically():
    v = np.array([1.0, 3.0, 3.0, 3.0, 2.0, 0.0])
    r = flag_quantile(v, 0.34, "grad_norm")  # k = ceil(2.04) = 3 -> threshold 3.0
    assert np.flatnonzero(r.flagged).tolist() == [1, 2, 3]
    r = flag_quantile(v, 0.2, "grad_norm")  # k = 2 -> threshold 3.0, all three tied flagged
    assert np.flatnonzero(r.flagged).tolist() == [1, 2, 3]
    # same result whatever the order of the input
    perm = np.array([5, 3, 0, 1, 4, 2])
    assert np.flatnonzero(flag_quantile(v[perm], 0.2, "g").flagged).tolist() == sorted(
        np.flatnonzero(np.isin(perm, [1, 2, 3])).tolist()
    )


def test_quantile_planted(planted):
    v, truth = planted
    r = flag_quantile(v, 10 / 510, "loss")
    assert r.n_flagged == 10
    np.testing.assert_array_equal(r.flagged, truth)


@pytest.mark.parametrize("q", [1.5, 0, 1, -0.1, float("nan")])
def test_quantile_bad_q(q):
    with pytest.raises(CleanError) as e:
        flag_quantile(np.arange(5.0), q, "loss")
    assert str(e.value) == f"flag.quantile must be in (0, 1), got {q}"


def test_quantile_bad_values():
    with pytest.raises(CleanError) as e:
        flag_quantile(np.array([1.0, np.nan, np.inf]), 0.1, "loss")
    assert str(e.value) == (
        "score 'loss' has 2 non-finite value(s) (NaN/inf); re-run the score stage or choose another score"
    )
    with pytest.raises(CleanError) as e:
        flag_quantile(np.array([]), 0.1, "loss")
    assert str(e.value) == "score 'loss' is empty: nothing to flag"
    with pytest.raises(CleanError) as e:
        flag_quantile("x", 0.1, "loss")
    assert str(e.value) == "score 'loss' must be a numeric array"
    with pytest.raises(CleanError) as e:
        flag_quantile(np.arange(5.0), "a", "loss")
    assert str(e.value) == "flag.quantile must be a number, got 'a'"


# --------------------------------------------------------------------------- mad


def test_mad_flags_exactly_planted(planted):
    v, truth = planted
    r = flag_mad(v, 3.5, "grad_norm")
    np.testing.assert_array_equal(r.flagged, truth)
    assert r.rule == "mad z(grad_norm) > 3.5"
    med = np.median(v)
    mad = np.median(np.abs(v - med))
    np.testing.assert_allclose(r.value, (v - med) / (1.4826 * mad))
    assert precision_recall(r.flagged, truth) == (1.0, 1.0)


def test_mad_one_sided():
    rng = np.random.default_rng(2)
    v = np.concatenate([rng.standard_normal(200), [-10.0, -12.0, 10.0]])
    r = flag_mad(v, 3.5, "margin")
    assert np.flatnonzero(r.flagged).tolist() == [202]
    assert r.value[200] < -3.5  # low outliers get very negative z but are not flagged


def test_mad_zero_falls_back_to_mean_abs_dev():
    v = np.array([1.0] * 6 + [2.0, 30.0])  # MAD = 0 (6 of 8 equal the median)
    r = flag_mad(v, 3.5, "loss")
    dev = np.abs(v - 1.0)
    z = (v - 1.0) / (1.2533 * dev.mean())
    np.testing.assert_allclose(r.value, z)
    assert r.rule == "meanad z(loss) > 3.5"
    assert np.flatnonzero(r.flagged).tolist() == [7]


def test_mad_all_equal_flags_nothing():
    r = flag_mad(np.full(20, 0.3), 3.5, "loss")
    assert not r.flagged.any()
    np.testing.assert_array_equal(r.value, np.zeros(20))
    assert r.rule == "mad z(loss) > 3.5 (all values equal: nothing flagged)"


@pytest.mark.parametrize("t", [0, -1.0, float("inf"), float("nan")])
def test_mad_bad_threshold(t):
    with pytest.raises(CleanError) as e:
        flag_mad(np.arange(5.0), t, "loss")
    assert str(e.value) == f"flag.threshold must be a finite number > 0, got {t}"


# --------------------------------------------------------------------------- isolation forest


def test_isolation_forest_planted():
    rng = np.random.default_rng(3)
    inliers = rng.standard_normal((500, 8))
    outliers = rng.standard_normal((10, 8)) * 0.5 + 6.0
    x = np.vstack([inliers, outliers])
    truth = np.r_[np.zeros(500, bool), np.ones(10, bool)]
    r = flag_isolation_forest(x, 0.05, seed=0)
    assert r.rule == "isolation-forest contamination=0.05"
    assert r.flagged.dtype == bool and r.value.shape == (510,)
    assert np.count_nonzero(r.flagged & truth) >= 9
    # value = -score_samples: planted points are the most anomalous
    assert auroc(r.value, truth) > 0.99
    top10 = np.argsort(-r.value)[:10]
    assert np.count_nonzero(truth[top10]) >= 9
    # flagged count ~ contamination * N
    assert abs(r.n_flagged - round(0.05 * 510)) <= 1
    # deterministic under a fixed seed
    r2 = flag_isolation_forest(x, 0.05, seed=0)
    np.testing.assert_array_equal(r.value, r2.value)
    np.testing.assert_array_equal(r.flagged, r2.flagged)


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(contamination=0.6), "flag.contamination must be in (0, 0.5], got 0.6"),
        (dict(contamination=0), "flag.contamination must be in (0, 0.5], got 0"),
        (dict(contamination=0.05, n_estimators=0), "flag.n_estimators must be an integer >= 1, got 0"),
        (dict(contamination=0.05, seed=-3), "seed must be a non-negative integer, got -3"),
    ],
)
def test_isolation_forest_bad_params(kw, msg):
    kw.setdefault("seed", 0)
    with pytest.raises(CleanError) as e:
        flag_isolation_forest(np.zeros((10, 2)), **kw)
    assert str(e.value) == msg


def test_isolation_forest_bad_features():
    with pytest.raises(CleanError) as e:
        flag_isolation_forest(np.zeros(10), 0.05, seed=0)
    assert str(e.value) == "isolation-forest features must be a 2-D array [N, k], got shape (10,)"
    x = np.zeros((10, 2))
    x[3, 1] = np.nan
    with pytest.raises(CleanError) as e:
        flag_isolation_forest(x, 0.05, seed=0)
    assert str(e.value) == "isolation-forest features have 1 row(s) with NaN/inf values"


# --------------------------------------------------------------------------- confident learning


def _noisy_probs(seed=0, n=600, c=4, n_flip=20):
    """Out-of-sample-like probabilities for true labels; n_flip given labels flipped."""
    rng = np.random.default_rng(seed)
    true = np.arange(n) % c
    logits = rng.normal(0, 1, (n, c))
    logits[np.arange(n), true] += 4.0
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    given = true.copy()
    flip = rng.choice(n, n_flip, replace=False)
    given[flip] = (true[flip] + rng.integers(1, c, n_flip)) % c
    truth = np.zeros(n, bool)
    truth[flip] = True
    return p, given, truth


def test_confident_finds_flipped_labels():
    p, given, truth = _noisy_probs()
    r = flag_confident(p, given)
    assert r.rule == "confident-learning prune_by_noise_rate"
    assert r.flagged.dtype == bool and r.flagged.shape == (600,)
    precision, recall = precision_recall(r.flagged, truth)
    assert recall >= 0.8 and precision >= 0.8
    # value = 1 - self-confidence p(given label)
    np.testing.assert_allclose(r.value, 1.0 - p[np.arange(600), given])
    assert auroc(r.value, truth) > 0.95


def test_confident_other_filter():
    p, given, truth = _noisy_probs(seed=1)
    r = flag_confident(p, given, filter_by="both")
    assert r.rule == "confident-learning both"
    assert precision_recall(r.flagged, truth)[1] >= 0.8


def test_confident_validation():
    p, given, _ = _noisy_probs(n=40, n_flip=2)
    bad = p.copy()
    bad[5] *= 0.5
    with pytest.raises(CleanError) as e:
        flag_confident(bad, given)
    assert str(e.value).startswith("pred_probs rows must sum to 1 (tolerance 0.001): 1 row(s) do not, e.g. row 5")
    with pytest.raises(CleanError) as e:
        flag_confident(p, given[:-1])
    assert str(e.value) == "labels must be a 1-D array [N] with N = 40, got shape (39,)"
    with pytest.raises(CleanError) as e:
        flag_confident(p[:, 0], given)
    assert str(e.value) == "pred_probs must be a 2-D array [N, C] with C >= 2, got shape (40,)"
    with pytest.raises(CleanError) as e:
        flag_confident(p, np.where(given == 0, 4, given))
    assert str(e.value) == "labels must be in [0, 4) to match pred_probs' 4 columns, got range [1, 4]"
    with pytest.raises(CleanError) as e:
        flag_confident(p, given, filter_by="nope")
    assert str(e.value) == (
        "flag.filter_by must be one of: prune_by_noise_rate, prune_by_class, both, "
        "confident_learning, predicted_neq_given, low_normalized_margin, low_self_confidence, noise_posterior; got 'nope'"
    )
    neg = p.copy()
    neg[0, 0] = -0.1
    with pytest.raises(CleanError) as e:
        flag_confident(neg, given)
    assert str(e.value) == "pred_probs must be finite probabilities in [0, 1]"


# --------------------------------------------------------------------------- benchmark helpers


def test_auroc_and_precision_recall():
    truth = np.array([0, 0, 1, 1], bool)
    assert auroc([0.1, 0.2, 0.8, 0.9], truth) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], truth) == 0.0
    assert auroc([0.1, 0.9, 0.2, 0.8], truth) == 0.5
    with pytest.raises(CleanError) as e:
        auroc([0.1, 0.2], [False, False])
    assert str(e.value) == "auroc is undefined: truth must contain both positives and negatives"
    assert precision_recall([1, 1, 0, 0], truth) == (0.0, 0.0)
    assert precision_recall([0, 1, 1, 0], truth) == (0.5, 0.5)
    assert precision_recall([0, 0, 0, 0], truth) == (0.0, 0.0)
    assert precision_recall([0, 0, 1, 1], [0, 0, 0, 0]) == (0.0, 0.0)


def test_gmm_finds_a_planted_mode_without_knowing_its_size():
    rng = np.random.default_rng(0)
    clean = rng.normal(0.0, 1.0, 800)
    noisy = rng.normal(8.0, 1.5, 200)  # 20 % in a second mode
    v = np.concatenate([clean, noisy])
    truth = np.r_[np.zeros(800, bool), np.ones(200, bool)]
    from pipeline.rules.metrics import precision_recall
    from pipeline.rules.threshold import flag_gmm

    res = flag_gmm(v, "loss")
    p, r = precision_recall(res.flagged, truth)
    assert p > 0.98 and r > 0.98
    assert res.rule.startswith("gmm p(high loss) > 0.5") and "high weight 0.20" in res.rule
    assert ((res.value >= 0) & (res.value <= 1)).all()
    # the far low tail is never flagged even if the high component is wider
    assert not res.flagged[np.argmin(v)]
    # constant input flags nothing
    assert not flag_gmm(np.ones(10), "loss").flagged.any()
