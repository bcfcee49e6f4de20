import json

import numpy as np
import pytest
import torch

from pipeline.errors import CleanError
from pipeline.stages.evaluate import evaluate
from pipeline.models import create_model, load_trained, load_weights, save_weights
from pipeline.stages.prepare import prepare
from pipeline.config import PrepareConfig
from pipeline.stages.train import train
from pipeline.training.fit import fit
from pipeline.training.recipe import Recipe, lr_at

from .helpers import make_imagefolder, tiny_arrays


def recipe(**kw):
    base = dict(model="small_cnn", epochs=2, batch_size=8, lr=1e-2, seed=0, device="cpu")
    base.update(kw)
    return Recipe(**base)


def test_same_seed_gives_identical_weights_and_dynamics():
    x, y = tiny_arrays()
    a = fit(x, y, 3, recipe())
    b = fit(x, y, 3, recipe())
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for k in a.dynamics:
        np.testing.assert_array_equal(a.dynamics[k], b.dynamics[k])
    c = fit(x, y, 3, recipe(seed=1))
    assert not torch.equal(c.model.state_dict()["head.weight"], sa["head.weight"])


def test_dynamics_are_consistent_per_sample():
    x, y = tiny_arrays()
    r = fit(x, y, 3, recipe(epochs=3, model="small_cnn_bn"))
    d = r.dynamics
    assert d["loss"].shape == d["margin"].shape == d["p_label"].shape == d["correct"].shape == (3, len(y))
    # every sample seen once per epoch: no row left at its zero initial value for p_label
    assert (d["p_label"] > 0).all() and (d["p_label"] <= 1).all()
    np.testing.assert_allclose(d["loss"], -np.log(d["p_label"]), rtol=1e-4, atol=1e-5)
    assert ((d["margin"] > 0) == d["correct"]).all()


def test_batch_of_one_is_merged_for_batchnorm():
    x, y = tiny_arrays(n_per_class=3)  # 9 samples, batch 8 → last batch of 1 merged
    r = fit(x, y, 3, recipe(model="small_cnn_bn", batch_size=8, epochs=1))
    assert (r.dynamics["p_label"] > 0).all()


def test_lr_schedules():
    assert lr_at(recipe(schedule="constant", lr=0.1, epochs=4), 3) == pytest.approx(0.1)
    r = recipe(schedule="cosine", lr=0.1, epochs=4)
    assert [round(lr_at(r, e), 6) for e in range(4)] == [0.1, 0.085355, 0.05, 0.014645]
    s = recipe(schedule="step", lr=0.1, step_size=2, gamma=0.5, epochs=5)
    assert [lr_at(s, e) for e in range(5)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])


def test_diverging_loss_stops_with_clear_error():
    x, y = tiny_arrays()
    x = x.copy()
    with pytest.raises(CleanError, match=r"training diverged: the loss became (nan|inf) at epoch \d+.*lower train.lr"):
        fit(x, y, 3, recipe(optimizer="sgd", lr=1e30, momentum=0.0, epochs=3))


def test_train_stage_writes_every_file_and_reloads(tmp_path):
    make_imagefolder(tmp_path / "imgs")
    prepare(tmp_path / "data",
            PrepareConfig(source="imagefolder", root=str(tmp_path / "imgs"), val_frac=0.2, test_frac=0.2, seed=0))
    out = tmp_path / "models" / "base"
    m = train(tmp_path / "data" / "manifest.csv", out, recipe(epochs=3, checkpoint_every=2))
    for f in ("model.safetensors", "config.json", "metrics.json", "dynamics.npz",
              "checkpoints/epoch_002.safetensors", "checkpoints/epoch_003.safetensors"):
        assert (out / f).exists(), f
    assert not (out / "checkpoints" / "epoch_001.safetensors").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert [c["epoch"] for c in cfg["checkpoints"]] == [2, 3]
    assert cfg["classes"] == ["a", "b", "c"] and cfg["in_chans"] == 1 and cfg["image_size"] == [8, 8]
    assert m["n_train"] == cfg["n_train"] == len(np.load(out / "dynamics.npz")["ids"])
    dyn = np.load(out / "dynamics.npz", allow_pickle=False)
    assert dyn["loss"].shape == (3, m["n_train"]) and dyn["lr"].shape == (3,)
    assert dyn["track_grad_norm"].shape == (3, len(dyn["track_ids"])) and set(dyn["track_ids"]) <= set(dyn["ids"])
    assert (dyn["track_grad_norm"] > 0).all()
    model, _ = load_trained(out)
    assert not model.training
    # no leftovers from atomic writes
    assert not list(out.rglob("*.tmp")) and not list(out.glob(".checkpoints.*"))

    met = evaluate(out, tmp_path / "data" / "manifest.csv", "base", metrics_dir=tmp_path / "metrics",
                   plots_dir=tmp_path / "plots", device="cpu")
    saved = json.loads((tmp_path / "metrics" / "base.json").read_text())
    assert saved["accuracy"] == met["accuracy"] and 0 <= met["accuracy"] <= 1
    # metrics are small and flat (dvc metrics diff); per-class accuracy and runs sit beside the plots
    assert set(saved) == {"accuracy", "accuracy_std", "n_train"}
    details = json.loads((tmp_path / "plots" / "evaluate_base.json").read_text())
    assert set(details["per_class_accuracy"]) == {"a", "b", "c"} and details["accuracy"] == saved["accuracy"]
    rows = (tmp_path / "plots" / "confusion_base.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) - 1 == details["n"]


def test_learns_the_tiny_task(tmp_path):
    x, y = tiny_arrays(n_per_class=20)
    r = fit(x, y, 3, recipe(epochs=8, lr=3e-3))
    assert r.history[-1]["train_accuracy"] >= 0.95


def test_weights_are_safetensors_and_checked(tmp_path):
    m = create_model("small_cnn", 3, 1, (8, 8))
    save_weights(m, tmp_path / "w.safetensors")
    other = create_model("small_cnn", 5, 1, (8, 8))
    with pytest.raises(CleanError, match="weights do not fit the model"):
        load_weights(other, tmp_path / "w.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(CleanError, match="not a readable safetensors file"):
        load_weights(m, tmp_path / "bad.safetensors")


def test_unknown_model_and_offline_pretrained_are_clear():
    with pytest.raises(CleanError, match=r"model.name: unknown model 'resnet_18'.*resnet18"):
        create_model("resnet_18", 3, 1, (8, 8))
    with pytest.raises(CleanError, match="small_cnn has no pretrained weights"):
        create_model("small_cnn", 3, 1, (8, 8), pretrained=True)
    with pytest.raises(CleanError, match="model.weights is set .*small_cnn_bn has no pretrained weights"):
        create_model("small_cnn_bn", 3, 1, (8, 8), weights="w.safetensors")
    with pytest.raises(CleanError, match="could not create 'small_cnn' for 1-channel 2x2 images"):
        create_model("small_cnn", 3, 1, (2, 2))


def test_small_nets_are_built_without_importing_timm_and_match_timms_registry():
    """Each stage process that loads a small net skips timm's ~2 s import; timm's registry
    (after register_with_timm) builds the same architecture."""
    import subprocess
    import sys

    code = ("import sys; from pipeline.models import create_model; m = create_model('small_cnn_bn', 4, 1, (8, 8)); "
            "print(type(m).__name__, 'timm' in sys.modules, 'torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["SmallCNN", "False", "False"], out
    import timm

    from pipeline.nets import register_with_timm

    register_with_timm()
    register_with_timm()  # idempotent
    a = create_model("small_cnn", 5, 3, (12, 12)).state_dict()
    b = timm.create_model("small_cnn", num_classes=5, in_chans=3, img_size=(12, 12)).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
