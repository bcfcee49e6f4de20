"""Train/val/test assignment and synthetic label noise."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import CleanError
from pipeline.data.noise import inject_noise
from pipeline.data.split import SplitWarning, assign_splits

LABELS = np.repeat(np.arange(5), 40)  # 5 classes x 40


def test_split_is_stratified_and_sized():
    s = assign_splits(LABELS, [None] * len(LABELS), val_frac=0.25, test_frac=0.25, seed=0)
    assert set(s) == {"train", "val", "test"}
    for c in range(5):
        in_c = s[LABELS == c]
        assert [(in_c == k).sum() for k in ("train", "val", "test")] == [20, 10, 10]


def test_split_is_deterministic_and_seeded():
    a = assign_splits(LABELS, [None] * 200, 0.1, 0.2, seed=3)
    b = assign_splits(LABELS, [None] * 200, 0.1, 0.2, seed=3)
    c = assign_splits(LABELS, [None] * 200, 0.1, 0.2, seed=4)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert [(a == k).sum() for k in ("train", "val", "test")] == [140, 20, 40]


def test_official_test_split_is_kept():
    official = ["train"] * 160 + ["test"] * 40
    labels = np.concatenate([np.repeat(np.arange(4), 40), np.arange(40) % 4])
    s = assign_splits(labels, official, val_frac=0.25, test_frac=0.3, seed=0)
    assert (s[160:] == "test").all()
    assert (s[:160] != "test").all()
    assert (s[:160] == "val").sum() == 40  # 25% of the official train part
    for c in range(4):
        assert (s[:160][labels[:160] == c] == "val").sum() == 10


def test_split_falls_back_when_a_class_is_too_small():
    labels = np.array([0] * 20 + [1] * 20 + [2])
    with pytest.warns(SplitWarning, match="not stratified.*least populated class"):
        s = assign_splits(labels, [None] * 41, 0.2, 0.2, seed=0)
    assert [(s == k).sum() for k in ("train", "val", "test")] == [25, 8, 8]


@pytest.mark.parametrize("val,test,msg", [(-0.1, 0.2, "data.val_frac"), (0.2, 1.0, "data.test_frac"),
                                          (0.6, 0.5, "val_frac \\+ data.test_frac must be < 1")])
def test_split_fraction_validation(val, test, msg):
    with pytest.raises(CleanError, match=msg):
        assign_splits(LABELS, [None] * 200, val, test, seed=0)


def test_split_rejects_too_few_samples():
    with pytest.raises(CleanError, match="too few samples"):
        assign_splits(np.array([0, 1]), [None, None], 0.3, 0.3, seed=0)


def test_symmetric_noise_exact_count_masked_and_never_same():
    labels = np.arange(300) % 3
    mask = np.arange(300) < 200
    new = inject_noise(labels, 3, rate=0.3, kind="symmetric", seed=7, mask=mask)
    changed = new != labels
    assert changed.sum() == 60  # round(0.3 * 200)
    assert not changed[~mask].any()
    assert ((new >= 0) & (new < 3)).all()
    np.testing.assert_array_equal(new, inject_noise(labels, 3, 0.3, "symmetric", 7, mask=mask))
    assert (new != inject_noise(labels, 3, 0.3, "symmetric", 8, mask=mask)).any()
    # every other class is reachable
    assert {(o, n) for o, n in zip(labels[changed], new[changed])} == {
        (o, n) for o in range(3) for n in range(3) if o != n}
    np.testing.assert_array_equal(inject_noise(labels, 3, 0.0, "symmetric", 7), labels)


def test_pair_noise_mapping():
    labels = np.arange(400) % 4
    new = inject_noise(labels, 4, 0.5, "pairs", seed=0)  # default c -> (c+1) % 4
    changed = new != labels
    assert changed.sum() == 200
    np.testing.assert_array_equal(new[changed], (labels[changed] + 1) % 4)

    new = inject_noise(labels, 4, 0.5, "pairs", seed=0, pairs={0: 2, "1": 3, 3: 3})
    changed = new != labels
    assert changed.sum() == 100  # only classes 0 and 1 are eligible: round(0.5 * 200)
    assert set(labels[changed]) == {0, 1}
    np.testing.assert_array_equal(new[changed], np.where(labels[changed] == 0, 2, 3))


@pytest.mark.parametrize("rate,kind,pairs,msg", [
    (1.0, "symmetric", None, "noise.rate"), (-0.1, "symmetric", None, "noise.rate"),
    (0.1, "flip", None, "symmetric, pairs"), (0.1, "pairs", {0: 9}, "out of range")])
def test_noise_validation(rate, kind, pairs, msg):
    with pytest.raises(CleanError, match=msg):
        inject_noise(np.arange(10) % 3, 3, rate, kind, seed=0, pairs=pairs)
