"""flag.filter_by / flag.heldout_filter_by `noise_posterior`: label issues by the Bayes posterior of the
true label under the annotators' estimated noise matrix (pipeline/rules/confident.py), checked against a
per-sample reference and cleanlab's own estimate."""
import numpy as np
import pytest

from pipeline.errors import CleanError
from pipeline.rules.confident import (clean_posterior, estimate_noise_matrix, flag_confident, noise_posterior,
                                      wrong_label_posterior)


def _pair_noise(n=2000, seed=0):
    """4 classes; 20 % of classes 0/1 flipped to each other (annotators confuse them); 10 % of classes 2/3
    are hard, correctly labelled images that the model takes for the other of the two."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, 4, n)
    logits = rng.normal(0, 1, (n, 4))
    logits[np.arange(n), true] += 3.0
    hard = (true >= 2) & (rng.random(n) < 0.1)
    logits[hard, 5 - true[hard]] += 4.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    given = true.copy()
    flip = (true < 2) & (rng.random(n) < 0.2)
    given[flip] = 1 - true[flip]
    return given, probs, flip, hard, true


def test_noise_posterior_equals_a_per_sample_reference():
    from cleanlab.count import estimate_py_and_noise_matrices_from_probabilities

    given, probs, _, _, _ = _pair_noise()
    t = estimate_noise_matrix(probs, given)
    np.testing.assert_allclose(t, estimate_py_and_noise_matrices_from_probabilities(given, probs)[1])
    np.testing.assert_allclose(t.sum(0), 1.0, atol=1e-9)  # columns: P(given | true) sums to 1 over given
    value, best = wrong_label_posterior(probs, given, t)
    inv = np.linalg.inv(t)
    for i in range(0, len(given), 97):  # the reference: one sample at a time
        clean = np.clip(inv @ probs[i], 0, None)  # the model predicts T·p: undo the annotators' noise
        clean /= clean.sum()
        q = np.array([t[given[i], j] * clean[j] for j in range(4)])  # Bayes' rule with the given label
        q /= q.sum()
        assert value[i] == pytest.approx(1 - q[given[i]], abs=1e-9)
        assert best[i] == int(np.argmax(q))
    res = noise_posterior(probs, given)
    np.testing.assert_allclose(res.value, value)
    np.testing.assert_array_equal(res.flagged, value > 0.5)
    assert 0 < res.flagged.sum() < len(given)
    assert flag_confident(probs, given, "noise_posterior").flagged.tolist() == res.flagged.tolist()


def test_noise_posterior_leaves_hard_images_of_unconfused_classes_alone():
    """cleanlab flags hard, correctly labelled images wherever the model errs confidently; the posterior
    weighs a disagreement by how often the annotators confuse the two classes: with the annotators'
    matrix (0/1 confused at 20 %, 2/3 never), none of the hard 2/3 images."""
    from cleanlab.filter import find_label_issues

    given, probs, flip, hard, _ = _pair_noise()
    t = np.eye(4)
    t[:2, :2] = [[0.8, 0.2], [0.2, 0.8]]
    res = noise_posterior(probs, given, t)
    cl = find_label_issues(given, probs, n_jobs=1)
    prec = lambda f: (f & flip).sum() / f.sum()  # noqa: E731
    assert (res.flagged & hard).sum() == 0 and (cl & hard).sum() >= 0.3 * hard.sum()
    assert prec(res.flagged) >= 0.95 > prec(cl)
    assert (res.flagged & flip).sum() >= 0.8 * flip.sum()
    est = noise_posterior(probs, given)  # the matrix estimated from the same probabilities
    assert prec(est.flagged) >= prec(cl) and (est.flagged & flip).sum() >= 0.85 * flip.sum()


def test_noise_posterior_with_a_given_matrix_and_a_bad_one():
    given, probs, _, _, _ = _pair_noise(n=400)
    t = np.eye(4)  # annotators who never err: nothing is wrong, nothing is flagged
    res = noise_posterior(probs, given, t)
    assert not res.flagged.any() and np.allclose(res.value, 0.0)
    # a model that learned the noisy labels of pure images predicts the columns of T: undone exactly
    t = np.eye(4)
    t[:2, :2] = [[0.8, 0.2], [0.2, 0.8]]
    np.testing.assert_allclose(clean_posterior(t.T, t), np.eye(4), atol=1e-12)
    value, _ = wrong_label_posterior(t.T, np.array([1, 0, 2, 2]), t)  # true classes 0, 1, 2, 3: two flips, one right
    np.testing.assert_allclose(value, [1, 1, 0, 1])  # the last: sure it is class 3, never mislabelled as 2: wrong
    # the same probabilities taken as a true-label posterior count the noise twice: a flip is a coin toss
    np.testing.assert_allclose(wrong_label_posterior(t.T, np.array([1, 0, 2, 2]), t, noisy=False)[0], [0.5, 0.5, 0, 1])
    with pytest.raises(CleanError, match=r"noise_matrix must be a \[4, 4\] array, got shape \(3, 3\)"):
        noise_posterior(probs, given, np.eye(3))
    with pytest.raises(CleanError, match="noise matrix .* is not finite .* use prune_by_class"):
        noise_posterior(probs, given, np.full((4, 4), np.nan))
