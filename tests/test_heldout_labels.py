"""heldout_label_issues: confident learning on out-of-sample (val/test) probabilities, checked
against cleanlab called directly."""
import numpy as np
import pytest

from pipeline.errors import CleanError
from pipeline.rules.labels import heldout_label_issues


def _noisy_probs(n=600, c=4, rate=0.15, seed=0):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, c, n)
    logits = rng.normal(0, 1, (n, c))
    logits[np.arange(n), true] += 3.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    given = true.copy()
    flip = rng.random(n) < rate
    given[flip] = (true[flip] + 1) % c
    return given, probs, flip, true


def test_heldout_label_issues_equals_cleanlab_and_finds_the_flips():
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels, probs, flip, true = _noisy_probs()
    is_issue, suggested, quality = heldout_label_issues(labels, probs)
    assert is_issue.dtype == bool and suggested.dtype == np.int64 and quality.dtype == np.float64
    np.testing.assert_array_equal(is_issue, find_label_issues(labels, probs, n_jobs=1))
    np.testing.assert_allclose(quality, get_label_quality_scores(labels, probs))
    np.testing.assert_array_equal(suggested, probs.argmax(1))
    # out-of-sample probabilities: the flips are found and their suggestion is the true label
    prec = (is_issue & flip).sum() / is_issue.sum()
    rec = (is_issue & flip).sum() / flip.sum()
    assert prec >= 0.8 and rec >= 0.8, (prec, rec)
    assert (suggested[is_issue & flip] == true[is_issue & flip]).mean() >= 0.9
    other = heldout_label_issues(labels, probs, filter_by="both")[0]
    np.testing.assert_array_equal(other, find_label_issues(labels, probs, filter_by="both", n_jobs=1))


def test_heldout_label_issues_refuses_logits():
    labels, probs, _, _ = _noisy_probs(n=50)
    with pytest.raises(CleanError, match="pred_probs must be"):
        heldout_label_issues(labels, np.log(probs) * 3)
