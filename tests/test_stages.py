"""flag / prune / retrain / sweep stages on a tiny dataset: exact kept sets, file contracts,
truth-scored flags, seeds, and the errors a mismatched input gets."""
import json

import numpy as np
import pandas as pd
import pytest

from pipeline.config import FlagConfig, PrepareConfig, PruneConfig
from pipeline.data.dataset import load_split
from pipeline.formats.manifest import read_manifest
from pipeline.errors import CleanError
from pipeline.stages.evaluate import evaluate
from pipeline.stages.flag import flag, gradient_features
from pipeline.stages.prepare import prepare
from pipeline.stages.prune import prune
from pipeline.stages.sweep import collect, sweep_point
from pipeline.stages.train import train
from pipeline.training.recipe import Recipe

from .helpers import make_imagefolder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    make_imagefolder(root / "imgs", n_per_class=10)
    prepare(root / "data",
            PrepareConfig(source="imagefolder", root=str(root / "imgs"), val_frac=0.1, test_frac=0.2, seed=0,
                          noise_rate=0.2))
    return root


def fake_scores(root, values=None):
    """scores.csv for the manifest's train ids with a controlled grad_norm / loss column."""
    df = read_manifest(root / "data/manifest.csv")
    tr = df[df["split"] == "train"].reset_index(drop=True)
    n = len(tr)
    v = np.arange(n, dtype=float)[::-1] if values is None else values
    sc = pd.DataFrame({"id": tr["id"], "path": tr["path"], "label": tr["label"], "pred": tr["label"],
                       "loss": v, "grad_norm": v + 1.0, "noisy": tr["noisy"]})
    root.joinpath("scores").mkdir(exist_ok=True)
    sc.to_csv(root / "scores/scores.csv", index=False)
    return tr, sc


def test_prune_max_gradient_keeps_exact_ids_and_leaves_val_test(data):
    tr, sc = fake_scores(data)
    s = prune(data / "data/manifest.csv", data / "scores/scores.csv", data / "data/pruned.csv",
              data / "prune/summary.json", PruneConfig(strategy="max-gradient", by="grad_norm", keep=0.5))
    out = pd.read_csv(data / "data/pruned.csv")
    full = read_manifest(data / "data/manifest.csv")
    n_keep = round(0.5 * len(tr))
    top = set(sc.sort_values("grad_norm", ascending=False)["id"].head(n_keep))
    assert set(out[out["split"] == "train"]["id"]) == top
    assert out[out["split"] != "train"].reset_index(drop=True).equals(full[full["split"] != "train"].reset_index(drop=True))
    assert list(out.columns) == list(full.columns)
    summ = json.loads((data / "prune/summary.json").read_text())
    assert summ["n_kept"] == n_keep == s["n_kept"] and summ["strategy"] == "max-gradient"
    assert summ["noisy_removed"] + summ["noisy_kept"] == int(tr["noisy"].sum())
    assert summ["label_entropy"]["uniform"] == pytest.approx(np.log(3))


def test_prune_rejects_scores_from_another_manifest(data):
    tr, sc = fake_scores(data)
    sc.iloc[1:].to_csv(data / "scores/short.csv", index=False)
    with pytest.raises(CleanError, match=r"does not match .*manifest.csv \(training id \d+ has no score; 0 extra, 1 missing\)"):
        prune(data / "data/manifest.csv", data / "scores/short.csv", data / "x.csv", data / "x.json",
              PruneConfig(strategy="random", keep=0.5))


def test_flag_mad_scores_itself_against_injected_noise(data):
    tr, _ = fake_scores(data)
    noisy = tr["noisy"].to_numpy().astype(bool)
    loss = np.where(noisy, 10.0 + np.arange(len(tr)) * 0.01, np.linspace(0.1, 0.3, len(tr)))
    fake_scores(data, loss)
    s = flag(data / "scores/scores.csv", data / "scores", FlagConfig(method="mad", score="loss", threshold=3.5))
    fl = pd.read_csv(data / "scores/flags.csv")
    # flags.csv contract: the driving rule first, then is_<type>/<type>_score per issue type found
    assert list(fl.columns[:6]) == ["id", "flagged", "rule", "value", "is_label", "label_score"]
    assert set(fl[fl["flagged"] == 1]["id"]) == set(tr["id"][noisy]) == set(fl[fl["is_label"] == 1]["id"])
    assert s["precision"] == 1.0 and s["recall"] == 1.0 and s["auroc"] == 1.0
    assert fl["rule"].iloc[0].startswith("mad z(loss) > 3.5")


def test_drop_flagged_removes_exactly_the_flagged(data):
    tr, _ = fake_scores(data)
    fl = pd.DataFrame({"id": tr["id"], "flagged": (np.arange(len(tr)) % 4 == 0).astype(int), "rule": "r", "value": 0.0})
    fl.to_csv(data / "scores/flags.csv", index=False)
    prune(data / "data/manifest.csv", data / "scores/scores.csv", data / "data/pruned.csv", data / "prune/s.json",
          PruneConfig(strategy="drop-flagged"), flags_csv=data / "scores/flags.csv")
    out = pd.read_csv(data / "data/pruned.csv")
    assert set(out[out["split"] == "train"]["id"]) == set(fl[fl["flagged"] == 0]["id"])


@pytest.fixture(scope="module")
def trained(data):
    recipe = Recipe(model="small_cnn", epochs=2, batch_size=8, lr=1e-2, device="cpu")
    train(data / "data/manifest.csv", data / "models/base", recipe, seeds=[0, 1])
    return recipe


def test_seeds_give_mean_std_and_every_run(data, trained):
    assert (data / "models/base/seeds/seed_1/model.safetensors").exists()
    assert not (data / "models/base/seeds/seed_0").exists()
    m = evaluate(data / "models/base", data / "data/manifest.csv", "base", metrics_dir=data / "metrics",
                 plots_dir=data / "plots", device="cpu")
    assert m["n_seeds"] == 2 and [r["seed"] for r in m["runs"]] == [0, 1]
    accs = [r["accuracy"] for r in m["runs"]]
    assert m["accuracy"] == pytest.approx(np.mean(accs)) and m["accuracy_std"] == pytest.approx(np.std(accs, ddof=1))
    # retraining with one seed removes the stale seed folder
    train(data / "data/manifest.csv", data / "models/one", trained, seeds=[3])
    assert not (data / "models/one/seeds").exists()


def test_isolation_forest_features_exact_and_projected(data, trained):
    tr, _ = fake_scores(data)
    ids = tr["id"].to_numpy()
    exact = gradient_features(data / "models/base", data / "data/manifest.csv", ids, dim=10_000, seed=0)
    assert exact.shape == (len(ids), 3 * (128 + 1))
    proj = gradient_features(data / "models/base", data / "data/manifest.csv", ids, dim=16, seed=0)
    assert proj.shape == (len(ids), 16)
    # JL: squared norms preserved on average
    ratio = (proj ** 2).sum(1).mean() / (exact ** 2).sum(1).mean()
    assert 0.5 < ratio < 1.5
    s = flag(data / "scores/scores.csv", data / "scores",
             FlagConfig(method="isolation-forest", contamination=0.1, projection_dim=16),
             model_dir=data / "models/base", manifest=data / "data/manifest.csv")
    assert s["n_flagged"] >= 1 and "auroc" in s


def test_confident_learning_cross_fits(data, trained):
    s = flag(data / "scores/scores.csv", data / "scores", FlagConfig(method="confident", folds=2),
             manifest=data / "data/manifest.csv", recipe=trained)
    fl = pd.read_csv(data / "scores/flags.csv")
    assert len(fl) == s["n"] and fl["value"].between(0, 1).all()
    assert "confident-learning" in fl["rule"].iloc[0]


def test_sweep_point_and_collect(data, trained, tmp_path):
    fake_scores(data)
    m = sweep_point(data / "data/manifest.csv", data / "scores/scores.csv", tmp_path / "sweep/random-0.5",
                    PruneConfig(strategy="random", keep=0.5), trained, seeds=[0, 1])
    pruned = pd.read_csv(tmp_path / "sweep/random-0.5/pruned.csv")
    # paths were rebased so the pruned manifest resolves from its own folder
    split = load_split(tmp_path / "sweep/random-0.5/pruned.csv", "train")
    assert len(split) == m["n_kept"] == int((pruned["split"] == "train").sum())
    assert m["n_seeds"] == 2 and 0 <= m["accuracy_mean"] <= 1
    assert not list((tmp_path / "sweep/random-0.5").glob(".models.*"))
    df = collect(tmp_path / "sweep", tmp_path / "plots/sweep.csv", ["random"], [0.5])
    assert df.to_dict("records")[0]["strategy"] == "random"
    with pytest.raises(CleanError, match="no sweep results"):
        collect(tmp_path / "sweep", tmp_path / "plots/s2.csv", ["gradient-cdf"], [0.5])


def test_low_is_suspicious_scores_are_flagged_at_the_low_end(data):
    tr, sc = fake_scores(data)
    aum = np.linspace(1.0, 2.0, len(tr))
    aum[:2] = [-5.0, -6.0]  # two clearly mislearned samples
    sc["aum"] = aum
    sc.to_csv(data / "scores/scores.csv", index=False)
    flag(data / "scores/scores.csv", data / "scores", FlagConfig(method="mad", score="aum", threshold=3.5))
    fl = pd.read_csv(data / "scores/flags.csv")
    assert set(fl[fl["flagged"] == 1]["id"]) == set(tr["id"][:2])
    assert fl["rule"].iloc[0].startswith("mad z(-aum)")


def test_collect_names_a_corrupt_sweep_result(tmp_path):
    (tmp_path / "sweep/random-0.5").mkdir(parents=True)
    (tmp_path / "sweep/random-0.5/metrics.json").write_text('{"strategy": "random"}')
    with pytest.raises(CleanError, match=r"random-0.5/metrics.json: not a sweep result \(missing keep, accuracy_mean"):
        collect(tmp_path / "sweep", tmp_path / "out.csv")
    (tmp_path / "sweep/random-0.5/metrics.json").write_text("[1, 2")
    with pytest.raises(CleanError, match="not a sweep result"):
        collect(tmp_path / "sweep", tmp_path / "out.csv")
