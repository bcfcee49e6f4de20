"""Score stage: dynamics scores against a hand computation, TracIn against a direct sum,
batch-size independence, the file contract, standalone inputs."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config import PrepareConfig, ScoreConfig
from pipeline.scores.dynamics import aum, confidence, dynamics_scores, forgetting, variability
from pipeline.errors import CleanError
from pipeline.scores.engine import per_sample_grad_norms
from pipeline.training.infer import normalize
from pipeline.models import load_trained, load_weights
from pipeline.stages.prepare import prepare
from pipeline.scores.compute import forward_scores
from pipeline.stages.score import columns, score

COLUMNS = columns()
from pipeline.stages.train import train
from pipeline.training.recipe import Recipe

from .helpers import make_imagefolder


def test_dynamics_scores_on_a_hand_made_history():
    # 4 epochs × 3 samples
    correct = np.array([[1, 0, 0], [0, 0, 1], [1, 0, 0], [0, 0, 1]], bool)
    margin = np.array([[1.0, -2.0, 0.5], [-1.0, -1.0, 0.5], [3.0, -3.0, 0.5], [-3.0, 0.0, 0.5]])
    p = np.array([[0.9, 0.1, 0.5], [0.3, 0.2, 0.5], [0.8, 0.1, 0.5], [0.2, 0.2, 0.5]])
    # sample 0: correct at e0,e2; flips 0→1 and 2→3 = 2; sample 1 never learned = 4 epochs;
    # sample 2: 0,1,0,1 → one flip (e1→e2)
    assert forgetting(correct).tolist() == [2.0, 4.0, 1.0]
    assert aum(margin).tolist() == [0.0, -1.5, 0.5]
    np.testing.assert_allclose(confidence(p), [0.55, 0.15, 0.5])
    np.testing.assert_allclose(variability(p), [np.std([0.9, 0.3, 0.8, 0.2]), np.std([0.1, 0.2, 0.1, 0.2]), 0.0])
    d = dynamics_scores({"margin": margin, "correct": correct, "p_label": p})
    assert set(d) == {"aum", "forgetting", "confidence", "variability"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("scores")
    make_imagefolder(root / "imgs", n_per_class=8)
    prepare(root / "data",
            PrepareConfig(source="imagefolder", root=str(root / "imgs"), val_frac=0.2, test_frac=0.25, seed=0))
    recipe = Recipe(model="small_cnn_bn", epochs=3, batch_size=8, lr=1e-2, device="cpu", seed=0, checkpoint_every=1)
    train(root / "data" / "manifest.csv", root / "models" / "base", recipe)
    return root


def test_score_stage_writes_the_contract(trained):
    out = trained / "scores"
    df = score(trained / "models/base", trained / "data/manifest.csv", out,
               ScoreConfig(norm="l2", subset="all", batch_size=7, device="cpu"))
    on_disk = pd.read_csv(out / "scores.csv")
    assert list(on_disk.columns) == COLUMNS
    manifest = pd.read_csv(trained / "data/manifest.csv")
    assert sorted(on_disk["id"]) == sorted(manifest[manifest["split"] == "train"]["id"])
    assert on_disk[COLUMNS[4:]].notna().all().all()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["norm"] == "l2" and meta["params"] == "all" and meta["n"] == len(df)
    assert [c["file"] for c in meta["self_influence"]["checkpoints"]] == [
        "epoch_001.safetensors", "epoch_002.safetensors", "epoch_003.safetensors"]
    # loss, el2n, margin against a direct computation
    model, cfg = load_trained(trained / "models/base")
    from pipeline.data.dataset import load_split

    data = load_split(trained / "data/manifest.csv", "train", cfg["image_size"])
    with torch.no_grad():
        logits = model(normalize(data.images, cfg["mean"], cfg["std"])).double()
    y = torch.as_tensor(data.labels)
    p = torch.softmax(logits, 1)
    np.testing.assert_allclose(df["loss"], torch.nn.functional.cross_entropy(logits, y, reduction="none"), rtol=1e-4)
    np.testing.assert_allclose(df["el2n"], (p - torch.nn.functional.one_hot(y, 3)).norm(dim=1), rtol=1e-4)
    zy = logits.gather(1, y[:, None])[:, 0]
    other = logits.scatter(1, y[:, None], -np.inf).amax(1)
    np.testing.assert_allclose(df["margin"], zy - other, rtol=1e-4, atol=1e-5)
    # dynamics columns equal the recorded history, matched by id
    dyn = np.load(trained / "models/base/dynamics.npz")
    pos = {int(i): k for k, i in enumerate(dyn["ids"])}
    k = [pos[int(i)] for i in df["id"]]
    np.testing.assert_allclose(df["aum"], dyn["margin"].mean(0)[k], rtol=1e-6)


def test_self_influence_is_the_lr_weighted_sum_over_checkpoints(trained):
    df = score(trained / "models/base", trained / "data/manifest.csv", trained / "s2",
               ScoreConfig(subset="last", device="cpu"))
    model, cfg = load_trained(trained / "models/base")
    from pipeline.data.dataset import load_split

    data = load_split(trained / "data/manifest.csv", "train", cfg["image_size"])
    x = normalize(data.images, cfg["mean"], cfg["std"])
    y = torch.as_tensor(data.labels)
    expected = np.zeros(len(y))
    for c in cfg["checkpoints"]:
        load_weights(model, trained / "models/base/checkpoints" / c["file"])
        model.eval()
        for i in range(len(y)):  # per-sample loop reference
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
            head = model.get_classifier()
            g2 = head.weight.grad.pow(2).sum() + head.bias.grad.pow(2).sum()
            expected[i] += c["lr"] * g2.item()
    np.testing.assert_allclose(df["self_influence"], expected, rtol=1e-4)


def test_scores_do_not_depend_on_batch_size(trained):
    model, cfg = load_trained(trained / "models/base")
    from pipeline.data.dataset import load_split

    data = load_split(trained / "data/manifest.csv", "train", cfg["image_size"])
    a = forward_scores(model, data.images, data.labels, cfg["mean"], cfg["std"], "l1", "all", batch_size=len(data))
    b = forward_scores(model, data.images, data.labels, cfg["mean"], cfg["std"], "l1", "all", batch_size=5)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_score_rejects_a_model_from_other_classes(trained, tmp_path):
    make_imagefolder(tmp_path / "other", n_per_class=3, classes=("x", "y", "z"))
    prepare(tmp_path / "d",
            PrepareConfig(source="imagefolder", root=str(tmp_path / "other"), val_frac=0.0, test_frac=0.0, seed=0))
    with pytest.raises(CleanError, match="was trained on classes"):
        score(trained / "models/base", tmp_path / "d/manifest.csv", tmp_path / "s", ScoreConfig(device="cpu"))


def test_standalone_score_on_a_folder_and_with_a_model_name(trained, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["score", str(trained / "imgs"), "--model", str(trained / "models/base"),
                              "--subset", "last", "--top", "3"])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(tmp_path / "scores/scores.csv")
    assert len(df) == 24 and "top 3 by grad_norm" in res.output
    assert (tmp_path / "scores/input/manifest.csv").exists()
    # a model name trains first, then scores
    res = runner.invoke(app, ["score", str(trained / "imgs"), "--model", "small_cnn", "--epochs", "1",
                              "--subset", "last", "--device", "cpu", "--out", "s2"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "models/small_cnn/model.safetensors").exists()
    assert len(pd.read_csv(tmp_path / "s2/scores.csv")) == 24
    res = runner.invoke(app, ["score", str(tmp_path / "nope"), "--model", str(trained / "models/base")])
    assert res.exit_code == 2 and "no such file or folder" in res.output


def test_corrupt_training_record_is_named(trained, tmp_path):
    import shutil

    shutil.copytree(trained / "models/base", tmp_path / "m")
    (tmp_path / "m/dynamics.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CleanError, match=r"dynamics.npz: not a readable training record .*re-run `clean train"):
        score(tmp_path / "m", trained / "data/manifest.csv", tmp_path / "s",
              ScoreConfig(subset="last", self_influence=False, device="cpu"))


@pytest.mark.parametrize("split", ["train", "all"])
def test_embeddings_from_the_scoring_pass_equal_a_separate_features_pass(trained, tmp_path, split):
    """score reuses the scored rows' features from its own forward pass; every row of
    embeddings.npz must equal an independent image_features pass over the whole manifest."""
    from pipeline.data.images import load_images
    from pipeline.scores.features import FEATURE_KEYS, image_features

    score(trained / "models/base", trained / "data/manifest.csv", tmp_path,
          ScoreConfig(subset="last", batch_size=5, device="cpu", split=split, embeddings=True))
    got = np.load(tmp_path / "embeddings.npz")
    model, cfg = load_trained(trained / "models/base", "cpu")
    manifest = pd.read_csv(trained / "data/manifest.csv")
    x = load_images(manifest["path"].tolist(), trained / "data", cfg["image_size"], cfg["in_chans"])
    ref = image_features(model, x, cfg["mean"], cfg["std"], 64, "cpu")
    assert got["ids"].tolist() == manifest["id"].tolist()
    assert set(manifest["split"]) >= {"train", "val", "test"}
    for k in FEATURE_KEYS:
        assert got[k].shape == ref[k].shape, k
        if k == "emb":
            np.testing.assert_allclose(got[k].astype(np.float32), ref[k].astype(np.float32), rtol=2e-3, atol=2e-3)
        else:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_native_sizes_come_from_prepare_when_uniform_else_from_each_file(tmp_path, monkeypatch):
    """embeddings.npz height/width are every file's stored size: read from classes.json when prepare
    saw a single size (no second pass over a million files), from each file's header otherwise."""
    from PIL import Image

    import pipeline.scores.features as F

    root = make_imagefolder(tmp_path / "imgs", n_per_class=6)
    odd = root / "b" / "003.png"
    Image.open(odd).resize((12, 5)).save(odd)  # one image 5 x 12 among 8 x 8
    for name, mixed in (("mixed", True), ("uniform", False)):
        if not mixed:
            Image.open(odd).resize((8, 8)).save(odd)
        prepare(tmp_path / name,
                PrepareConfig(source="imagefolder", root=str(root), val_frac=0.2, test_frac=0.2, seed=0))
        info = json.loads((tmp_path / name / "classes.json").read_text())
        assert info["uniform_size"] is (not mixed) and info["image_size"] == [8, 8]
        recipe = Recipe(model="small_cnn", epochs=1, batch_size=8, device="cpu", seed=0, checkpoint_every=1)
        train(tmp_path / name / "manifest.csv", tmp_path / name / "model", recipe)
        calls = []
        real = F.native_sizes
        monkeypatch.setattr(F, "native_sizes", lambda *a: calls.append(1) or real(*a))
        score(tmp_path / name / "model", tmp_path / name / "manifest.csv", tmp_path / name / "scores",
              ScoreConfig(subset="last", device="cpu", self_influence=False, val_influence=False))
        z = np.load(tmp_path / name / "scores" / "embeddings.npz")
        paths = pd.read_csv(tmp_path / name / "manifest.csv")["path"].map(str).tolist()
        want = [Image.open(p).size[::-1] for p in paths]
        assert list(zip(z["height"].tolist(), z["width"].tolist())) == want
        assert calls == ([1] if mixed else [])


def test_embeddings_hold_every_seed_models_embeddings(trained, tmp_path):
    """With several train.seeds, embeddings.npz holds emb_1, … = each other seed model's embedding of every
    manifest row (equal to a separate pass with that model) and emb_seeds = the seeds, the scored one first;
    score.seed_embeddings: false writes the scored model's only."""
    from pipeline.data.images import load_images
    from pipeline.scores.features import embed

    recipe = Recipe(model="small_cnn", epochs=1, batch_size=8, lr=1e-2, device="cpu", seed=3, checkpoint_every=1)
    train(trained / "data/manifest.csv", tmp_path / "m", recipe, seeds=[3, 5])
    cfgs = dict(subset="last", batch_size=5, device="cpu", self_influence=False, val_influence=False,
                importance=False, embeddings=True)
    score(tmp_path / "m", trained / "data/manifest.csv", tmp_path / "s", ScoreConfig(seed_embeddings=True, **cfgs))
    got = dict(np.load(tmp_path / "s/embeddings.npz"))
    assert got["emb_seeds"].tolist() == [3, 5] and "emb_2" not in got
    other, cfg = load_trained(tmp_path / "m/seeds/seed_5", "cpu")
    manifest = pd.read_csv(trained / "data/manifest.csv")
    x = load_images(manifest["path"].tolist(), trained / "data", cfg["image_size"], cfg["in_chans"])
    ref = embed(other, x, cfg["mean"], cfg["std"], 64, "cpu")
    assert got["emb_1"].shape == got["emb"].shape == ref.shape
    np.testing.assert_allclose(got["emb_1"].astype(np.float32), ref.astype(np.float32), rtol=2e-3, atol=2e-3)
    assert not np.allclose(got["emb_1"].astype(np.float32), got["emb"].astype(np.float32), atol=1e-2)
    score(tmp_path / "m", trained / "data/manifest.csv", tmp_path / "s1", ScoreConfig(seed_embeddings=False, **cfgs))
    assert not {"emb_1", "emb_seeds"} & set(np.load(tmp_path / "s1/embeddings.npz").files)
