"""The verdict beyond seed noise: Welch's t-test on per-seed accuracies, against scipy."""
import numpy as np
import pytest
from scipy import stats

from pipeline.verdict import compare_runs, sentence


def test_welch_p_value_and_interval_match_the_definition():
    new, base = [0.971, 0.968, 0.975, 0.970], [0.962, 0.958, 0.966]
    v = compare_runs(new, base)
    assert v["diff"] == pytest.approx(np.mean(new) - np.mean(base), abs=1e-6)
    assert v["p"] == pytest.approx(stats.ttest_ind(new, base, equal_var=False).pvalue, abs=1e-6)
    # the 95 % interval's ends are where a shifted Welch test has p = 0.05 exactly
    for end in (v["ci_low"], v["ci_high"]):
        p_end = stats.ttest_ind(np.asarray(new) - end, base, equal_var=False).pvalue
        assert p_end == pytest.approx(0.05, abs=2e-4)
    assert v["verdict"] == "better" and "beyond seed noise" in sentence("pruned", "base", v)


def test_within_seed_noise_and_worse():
    same = compare_runs([0.97, 0.96, 0.965], [0.966, 0.968, 0.962])
    assert same["verdict"] == "n.s." and same["ci_low"] < 0 < same["ci_high"]
    assert "within seed noise" in sentence("pruned", "base", same)
    worse = compare_runs([0.90, 0.901, 0.899], [0.95, 0.951, 0.949])
    assert worse["verdict"] == "worse" and worse["ci_high"] < 0


def test_one_seed_has_no_test():
    v = compare_runs([0.97], [0.96, 0.95])
    assert v["p"] is None and v["verdict"] == "no test" and v["diff"] == pytest.approx(0.015)
