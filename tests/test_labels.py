"""Label issues without k-fold: the mean pre-update softmax recorded by `clean train`, averaged
over seeds, and the confident-dynamics rule on planted label noise."""
import numpy as np
import pandas as pd
import pytest

from pipeline.config import FlagConfig, PrepareConfig, ScoreConfig
from pipeline.formats.dynamics import load_dynamics
from pipeline.rules.base import seed_mean_probs
from pipeline.stages.flag import flag
from pipeline.stages.prepare import prepare
from pipeline.stages.score import score
from pipeline.stages.train import train
from pipeline.training.recipe import Recipe

from .helpers import make_imagefolder


RECIPE = Recipe(epochs=8, batch_size=16, device="cpu", track=0, checkpoint_every=8, lr=3e-3, schedule="constant")


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    root = tmp_path_factory.mktemp("labels")
    make_imagefolder(root / "imgs", n_per_class=30, classes=("a", "b", "c", "d"))
    prepare(root / "data",
            PrepareConfig(source="imagefolder", root=str(root / "imgs"), val_frac=0.1, test_frac=0.2, seed=0,
                          noise_rate=0.2))
    train(root / "data/manifest.csv", root / "models/base", RECIPE, seeds=[0, 1])
    score(root / "models/base", root / "data/manifest.csv", root / "scores",
          ScoreConfig(subset="last", device="cpu", self_influence=False, embeddings=False))
    return root


def test_mean_softmax_is_the_epoch_mean_of_the_recorded_pre_update_probabilities(noisy):
    dyn = load_dynamics(noisy / "models/base/dynamics.npz", need=("probs", "p_label"))
    probs, labels = dyn["probs"].astype(np.float64), dyn["labels"]
    assert probs.shape == (len(labels), 4)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    # p(label) recorded per epoch from the same forward pass, before the update, over the first epochs
    k = RECIPE.probs_epochs
    assert k == 4 < RECIPE.epochs
    np.testing.assert_allclose(probs[np.arange(len(labels)), labels], dyn["p_label"][:k].mean(0), rtol=1e-5, atol=1e-6)


def test_seed_average_is_the_mean_of_every_seeds_record(noisy):
    base = noisy / "models/base"
    d0 = load_dynamics(base / "dynamics.npz", need=("probs",))
    d1 = load_dynamics(base / "seeds/seed_1/probs.npz", need=("ids", "probs"))
    ids = d0["ids"][::-1].copy()  # any order: aligned by id
    got = seed_mean_probs(base, ids)
    pos0 = {int(i): k for k, i in enumerate(d0["ids"])}
    pos1 = {int(i): k for k, i in enumerate(d1["ids"])}
    ref = np.stack([(d0["probs"][pos0[int(i)]].astype(np.float64) + d1["probs"][pos1[int(i)]]) / 2 for i in ids])
    ref /= ref.sum(1, keepdims=True)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert not np.allclose(d0["probs"], d1["probs"][[pos1[int(i)] for i in d0["ids"]]])  # two real runs


@pytest.mark.parametrize("filter_by, min_precision, min_recall", [
    # the default (the noise posterior): precise, finds fewer of this tiny fixture's symmetric flips (1.00 / 0.71)
    ("noise_posterior", 0.9, 0.6),
    # cleanlab's prune_by_class: both ≥ 0.8
    ("prune_by_class", 0.8, 0.8),
])
def test_confident_dynamics_finds_planted_label_noise_and_suggests_the_true_label(noisy, filter_by, min_precision,
                                                                                  min_recall):
    s = flag(noisy / "scores/scores.csv", noisy / "scores",
             FlagConfig(method="confident-dynamics", issues=["label"], filter_by=filter_by),
             model_dir=noisy / "models/base")
    fl = pd.read_csv(noisy / "scores/flags.csv")
    man = pd.read_csv(noisy / "data/manifest.csv").set_index("id").loc[fl["id"]]
    truth = man["noisy"].to_numpy().astype(bool)
    assert s["n_noisy"] == truth.sum() > 10
    assert s["precision"] >= min_precision and s["recall"] >= min_recall, s
    assert list(fl["is_label"]) == list(fl["flagged"])
    hit = fl["is_label"].to_numpy().astype(bool) & truth
    # the suggested label of a found error is the label before the noise was injected
    assert (fl["suggested_label"].to_numpy()[hit] == man["orig_label"].to_numpy()[hit]).mean() >= 0.9
    assert ((fl["label_score"] >= 0) & (fl["label_score"] <= 1)).all()


def test_confident_dynamics_without_a_training_record_says_how_to_fix_it(noisy, tmp_path):
    from pipeline.errors import CleanError

    with pytest.raises(CleanError, match="needs --model"):
        flag(noisy / "scores/scores.csv", tmp_path, FlagConfig(method="confident-dynamics", issues=["label"]))
