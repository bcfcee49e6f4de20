"""heldout_label_issues: confident learning on out-of-sample (val/test) probabilities, checked
against cleanlab called directly."""
import numpy as np
import pytest

from pipeline.config import PrepareConfig
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


@pytest.fixture(scope="module")
def noisy_everywhere(tmp_path_factory):
    """A tiny folder with 25 % label noise in train, val and test alike, a 2-seed base model and its scores."""
    from pipeline.config import PrepareConfig, ScoreConfig
    from pipeline.stages.prepare import prepare
    from pipeline.stages.score import score
    from pipeline.stages.train import train
    from pipeline.training.recipe import Recipe

    from .helpers import make_imagefolder

    root = tmp_path_factory.mktemp("heldout")
    make_imagefolder(root / "imgs", n_per_class=40, classes=("a", "b", "c", "d"))
    prepare(root / "data", PrepareConfig(source="imagefolder", root=str(root / "imgs"), val_frac=0.25, test_frac=0.25,
                                         seed=0, noise_rate=0.25, noise_splits=["train", "val", "test"]))
    recipe = Recipe(epochs=8, batch_size=16, device="cpu", track=0, checkpoint_every=8, lr=3e-3, schedule="constant")
    train(root / "data/manifest.csv", root / "models/base", recipe, seeds=[0, 1])
    score(root / "models/base", root / "data/manifest.csv", root / "scores",
          ScoreConfig(subset="last", device="cpu", self_influence=False, embeddings=False, val_influence=False))
    return root


@pytest.fixture(scope="module")
def flagged(noisy_everywhere):
    from pipeline.config import FlagConfig
    from pipeline.stages.flag import flag

    root = noisy_everywhere
    # cleanlab's filters here (the default, noise_posterior, has its own test below)
    cfg = FlagConfig(issues=["label"], device="cpu", filter_by="prune_by_class", heldout_filter_by="prune_by_noise_rate")
    return flag(root / "scores/scores.csv", root / "scores", cfg,
                model_dir=root / "models/base", manifest=root / "data/manifest.csv")


def test_flags_csv_has_val_and_test_label_issues_from_the_base_models(noisy_everywhere, flagged):
    """flags.csv carries a row per val/test image: is_label = heldout_label_issues (flag.heldout_filter_by
    prune_by_noise_rate) on the seed-mean eval softmax of models/base (reference computed here), the suggestion = its argmax; the
    training rows and every training-only reader are unchanged."""
    import pandas as pd
    import torch

    from pipeline.formats.tables import read_flags
    from pipeline.models import load_trained
    from pipeline.data.dataset import load_split
    from pipeline.training.infer import predict_logits

    root, s = noisy_everywhere, flagged
    fl = pd.read_csv(root / "scores/flags.csv")
    man = pd.read_csv(root / "data/manifest.csv").set_index("id")
    assert list(fl["split"]) == list(man.loc[fl["id"], "split"])
    assert set(fl["split"]) == {"train", "val", "test"} and len(fl) == len(man)
    for split in ("val", "test"):
        part = fl[fl["split"] == split]
        data = load_split(root / "data/manifest.csv", split)
        probs = np.zeros((len(data.ids), 4))
        for d in (root / "models/base", root / "models/base/seeds/seed_1"):
            model, cfg = load_trained(d)
            probs += torch.softmax(predict_logits(model, data.images, cfg["mean"], cfg["std"]).double(), 1).numpy() / 2
        ref_issue, ref_sug, ref_q = heldout_label_issues(data.labels, probs)
        got = part.set_index("id").loc[data.ids]
        np.testing.assert_array_equal(got["is_label"].to_numpy(bool), ref_issue)
        np.testing.assert_array_equal(got["suggested_label"].to_numpy(), ref_sug)
        np.testing.assert_allclose(got["label_score"], 1 - ref_q, atol=1e-6)
        assert (got["flagged"] == 0).all()  # the training rule never judges a held-out image
        truth = man.loc[data.ids, "noisy"].to_numpy(bool)
        assert truth.sum() >= 5
        hit = ref_issue & truth
        assert hit.sum() >= 0.6 * truth.sum() and s[f"n_label_{split}"] == ref_issue.sum()
        assert (ref_sug[hit] == man.loc[data.ids, "orig_label"].to_numpy()[hit]).all()
    train_ids = man.index[man["split"] == "train"].to_numpy()
    assert sorted(read_flags(root / "scores/flags.csv", train_ids)["id"]) == sorted(train_ids)
    assert len(read_flags(root / "scores/flags.csv", heldout=True)) == len(man)


def test_a_relabel_decision_on_a_test_image_changes_the_reviewed_accuracy_and_nothing_else(noisy_everywhere,
                                                                                        flagged, tmp_path):
    """metrics: `accuracy` on the given test labels, `accuracy_unflagged` without the flagged test
    images; a reviewed test label (decisions.csv) → `accuracy_reviewed`, moved by exactly one
    image; prune keeps every val/test row as it was."""
    import json

    import pandas as pd

    from pipeline.config import PruneConfig
    from pipeline.stages.evaluate import evaluate, evaluate_model, run_dirs
    from pipeline.stages.prune import prune

    root = noisy_everywhere
    man, fl = root / "data/manifest.csv", root / "scores/flags.csv"
    kw = dict(metrics_dir=tmp_path / "m", plots_dir=tmp_path / "p", device="cpu", flags_csv=fl)
    plain = evaluate(root / "models/base", man, "plain", kw["metrics_dir"], kw["plots_dir"], device="cpu")
    unfl = evaluate(root / "models/base", man, "unflagged", **kw)
    flags = pd.read_csv(fl)
    test_flagged = flags[(flags["split"] == "test") & (flags["is_label"] == 1)]["id"]
    runs = [evaluate_model(d, man) for d in run_dirs(root / "models/base")]
    ids, given = runs[0]["ids"], runs[0]["labels"]
    keep = ~np.isin(ids, test_flagged)
    assert unfl["n_set_aside"] == len(test_flagged) > 0
    assert unfl["accuracy_unflagged"] == pytest.approx(np.mean([(r["pred"] == given)[keep].mean() for r in runs]))
    assert "accuracy_unflagged" not in plain and plain["accuracy"] == unfl["accuracy"]
    # a kept test image both seeds get right: a person reviews it as another class
    agree = keep & (runs[0]["pred"] == given) & (runs[1]["pred"] == given)
    t = int(np.flatnonzero(agree)[0])
    other = (given[t] + 1) % len(runs[0]["classes"])
    names = json.loads((root / "data/classes.json").read_text())["classes"]
    res = {}
    for what, row in (("keep", f"{ids[t]},keep,,"), ("relabel", f"{ids[t]},relabel,{names[other]},")):
        dec = tmp_path / f"{what}.csv"
        dec.write_text("id,action,label,note\n" + row + "\n")
        res[what] = evaluate(root / "models/base", man, what, **kw, decisions=dec)
    n_kept = int(keep.sum())
    assert res["keep"]["accuracy_reviewed"] - res["relabel"]["accuracy_reviewed"] == pytest.approx(1 / n_kept)
    assert res["keep"]["accuracy_reviewed"] == pytest.approx(unfl["accuracy_unflagged"])
    for k in ("accuracy", "accuracy_std", "loss", "n", "n_set_aside"):
        assert res["relabel"][k] == unfl[k] == res["keep"][k], k
    flat = json.loads((tmp_path / "m/relabel.json").read_text())
    assert set(flat) == {"accuracy", "accuracy_std", "n_train", "accuracy_reviewed"}
    # prune: the test decision is evaluate's; the val/test rows stay as they were
    prune(man, root / "scores/scores.csv", tmp_path / "pruned.csv", tmp_path / "s.json",
          PruneConfig(strategy="drop-flagged"), flags_csv=fl, decisions=tmp_path / "relabel.csv")
    before, after = pd.read_csv(man), pd.read_csv(tmp_path / "pruned.csv")
    cols = ["id", "path", "label", "split"]
    pd.testing.assert_frame_equal(before[before["split"] != "train"][cols].reset_index(drop=True),
                                  after[after["split"] != "train"][cols].reset_index(drop=True))


def test_label_min_p_keeps_only_confident_label_issues_in_every_split(noisy_everywhere, flagged, tmp_path):
    """flag.label_min_p: the label issues of train (confident-dynamics) and of val/test are those of
    the default run whose suggestion has p̄ ≥ the cut — a subset, nothing else changes."""
    import pandas as pd

    from pipeline.config import FlagConfig
    from pipeline.stages.flag import flag

    root = noisy_everywhere
    base = pd.read_csv(root / "scores/flags.csv").set_index("id")
    ps = np.unique(base.loc[base["is_label"] == 1, "suggested_p"])
    cut = float(ps[len(ps) // 2 - 1: len(ps) // 2 + 1].mean())  # between two flagged values: no tie with rounding
    flag(root / "scores/scores.csv", tmp_path, FlagConfig(issues=["label"], device="cpu", label_min_p=cut),
         model_dir=root / "models/base", manifest=root / "data/manifest.csv")
    got = pd.read_csv(tmp_path / "flags.csv").set_index("id").loc[base.index]
    expect = (base["is_label"] == 1) & (base["suggested_p"] >= cut)
    assert 0 < expect.sum() < (base["is_label"] == 1).sum()
    np.testing.assert_array_equal(got["is_label"].to_numpy(bool), expect.to_numpy())
    for split in ("train", "val", "test"):
        assert (got.loc[got["split"] == split, "is_label"] <= base.loc[base["split"] == split, "is_label"]).all()
    train = got["split"] == "train"
    np.testing.assert_array_equal(got.loc[train, "flagged"], got.loc[train, "is_label"])
    assert f"p̄ ≥ {cut:g}" in got.loc[train, "rule"].iloc[0]
    np.testing.assert_allclose(got["suggested_p"], base["suggested_p"])


def test_noise_posterior_in_every_split_uses_the_training_noise_matrix(noisy_everywhere, tmp_path):
    """flag.filter_by / heldout_filter_by `noise_posterior` (the defaults): train rows = noise_posterior on p̄ (∧ AUM, as
    every confident-dynamics filter); val/test rows = noise_posterior on the base models' eval softmax
    with the noise matrix estimated ONCE on the training images (references computed here)."""
    import pandas as pd
    import torch

    from pipeline.config import FlagConfig
    from pipeline.data.dataset import load_split
    from pipeline.models import load_trained
    from pipeline.rules.base import seed_mean_probs
    from pipeline.rules.confident import estimate_noise_matrix, noise_posterior
    from pipeline.stages.flag import flag
    from pipeline.training.infer import predict_logits

    root = noisy_everywhere
    cfg = FlagConfig(issues=["label"], device="cpu")
    assert cfg.filter_by == cfg.heldout_filter_by == "noise_posterior"
    flag(root / "scores/scores.csv", tmp_path, cfg, model_dir=root / "models/base", manifest=root / "data/manifest.csv")
    fl = pd.read_csv(tmp_path / "flags.csv").set_index("id")
    man = pd.read_csv(root / "data/manifest.csv").set_index("id")
    sc = pd.read_csv(root / "scores/scores.csv")
    pbar = seed_mean_probs(root / "models/base", sc["id"].to_numpy())
    train = noise_posterior(pbar, sc["label"].to_numpy())
    aum_ok = sc["aum"].to_numpy() < cfg.aum_max
    np.testing.assert_array_equal(fl.loc[sc["id"], "is_label"].to_numpy(bool), train.flagged & aum_ok)
    assert "noise_posterior" in fl.loc[sc["id"], "rule"].iloc[0]
    t = estimate_noise_matrix(pbar, sc["label"].to_numpy())
    for split in ("val", "test"):
        data = load_split(root / "data/manifest.csv", split)
        probs = np.zeros((len(data.ids), 4))
        for d in (root / "models/base", root / "models/base/seeds/seed_1"):
            model, c = load_trained(d)
            probs += torch.softmax(predict_logits(model, data.images, c["mean"], c["std"]).double(), 1).numpy() / 2
        ref = noise_posterior(probs, data.labels, t)
        got = fl.loc[data.ids]
        np.testing.assert_array_equal(got["is_label"].to_numpy(bool), ref.flagged)
        np.testing.assert_allclose(got["label_score"], ref.value, atol=1e-6)
        # the split's own estimate differs, so the equalities above pin the training one
        assert not np.allclose(estimate_noise_matrix(probs, data.labels), t, atol=1e-3)
        truth = man.loc[data.ids, "noisy"].to_numpy(bool)
        assert ref.flagged.sum() > 0 and (ref.flagged & truth).sum() >= 0.5 * ref.flagged.sum()
