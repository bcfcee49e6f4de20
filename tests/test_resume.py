"""`clean train --resume`: an interrupted run continues from its newest saved epoch and ends
byte-identical to an uninterrupted one (weights, checkpoints, dynamics); the saved state is
pickle-free (safetensors + JSON); stale or foreign partial work is never silently reused."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.errors import CleanError
from pipeline.stages.train import PARTIAL, train
from pipeline.training.recipe import Recipe

from .helpers import prepared_folder


def recipe(**kw):
    base = dict(model="small_cnn_bn", epochs=3, batch_size=8, lr=1e-2, seed=0, device="cpu", checkpoint_every=1)
    base.update(kw)
    return Recipe(**base)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return prepared_folder(tmp_path_factory.mktemp("resume"), 10) / "data" / "manifest.csv"


def interrupt_at(event: str, text: str = "", after: int = 1):
    """A progress callback raising KeyboardInterrupt at the `after`-th `event` whose message has `text`."""
    seen = []

    def cb(ev, **kw):
        if ev == event and text in kw.get("message", ""):
            seen.append(ev)
            if len(seen) == after:
                raise KeyboardInterrupt

    return cb


def same_weights(x, y) -> bool:
    """Bit-for-bit equal tensors and metadata (safetensors orders metadata keys at random)."""
    ta, tb = load_file(str(x)), load_file(str(y))
    with safe_open(str(x), "pt") as fa, safe_open(str(y), "pt") as fb:
        meta = fa.metadata() == fb.metadata()
    return meta and ta.keys() == tb.keys() and all(
        ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape
        and ta[k].contiguous().view(-1).view(torch.uint8).equal(tb[k].contiguous().view(-1).view(torch.uint8))
        for k in ta)


def assert_same_run(a, b, with_seeds=()):
    assert same_weights(a / "model.safetensors", b / "model.safetensors")
    ca, cb = sorted((a / "checkpoints").iterdir()), sorted((b / "checkpoints").iterdir())
    assert [p.name for p in ca] == [p.name for p in cb]
    assert all(same_weights(x, y) for x, y in zip(ca, cb))
    da, db = np.load(a / "dynamics.npz"), np.load(b / "dynamics.npz")
    assert sorted(da.files) == sorted(db.files)
    for k in da.files:
        assert da[k].dtype == db[k].dtype and np.array_equal(da[k], db[k]), k
    ja, jb = json.loads((a / "config.json").read_text()), json.loads((b / "config.json").read_text())
    assert ja["history"] == jb["history"] and ja["checkpoints"] == jb["checkpoints"]
    for s in with_seeds:
        assert same_weights(a / f"seeds/seed_{s}/model.safetensors", b / f"seeds/seed_{s}/model.safetensors")
        assert not (b / f"seeds/seed_{s}/resume").exists()
    assert not (b / PARTIAL).exists()


def test_resume_after_epoch_2_of_3_is_byte_identical(manifest, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(manifest, full, recipe())
    with pytest.raises(KeyboardInterrupt):
        train(manifest, cut, recipe(), progress=interrupt_at("log", "epoch 2/3"))
    assert not (cut / "model.safetensors").exists()
    state_dir = cut / PARTIAL / "primary" / "resume"
    meta = json.loads((state_dir / "state.json").read_text())
    assert meta["epoch"] == 2 and len(meta["history"]) == 2
    # pickle-free: JSON + safetensors only, nothing else in the state folder
    assert sorted(p.name for p in state_dir.iterdir()) == ["state.json", "state_002.safetensors"]
    tensors = load_file(str(state_dir / meta["file"]))
    assert tensors["dyn/loss"].shape[0] == 2 and "rng/perm" in tensors and "rng/torch/0" in tensors
    assert any(k.startswith("optim/") and k.endswith("/exp_avg_sq") for k in tensors)

    logs = []
    train(manifest, cut, recipe(), resume=True, progress=lambda ev, **kw: logs.append(kw.get("message", "")))
    assert any("resuming after epoch 2/3" in m for m in logs)
    assert_same_run(full, cut)


def test_resume_mid_epoch_with_several_seeds_and_sgd(manifest, tmp_path):
    """Interrupted inside epoch 3 of the second seed: seed 0 is kept, seed 1 restarts from epoch 2."""
    r = recipe(optimizer="sgd", momentum=0.9, lr=5e-2, model="small_cnn", checkpoint_every=2)
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(manifest, full, r, seeds=[0, 1])
    logs = []

    def cb(ev, **kw):  # the first batch of seed 1's epoch 3, after its epoch-2 state was saved
        logs.append(kw.get("message", ""))
        if ev == "advance" and sum("epoch 2/3" in x for x in logs) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(manifest, cut, r, seeds=[0, 1], progress=cb)
    assert (cut / PARTIAL / "primary" / "metrics.json").exists()
    assert json.loads((cut / PARTIAL / "primary/seeds/seed_1/resume/state.json").read_text())["epoch"] == 2
    logs = []
    m = train(manifest, cut, r, seeds=[0, 1], resume=True, progress=lambda ev, **kw: logs.append(kw.get("message", "")))
    assert any("seed 0 (1/2): already trained" in x for x in logs)
    assert [run["seed"] for run in m["runs"]] == [0, 1]
    assert_same_run(full, cut, with_seeds=[1])


def test_resume_refuses_other_settings_and_plain_train_starts_over(manifest, tmp_path):
    out = tmp_path / "m"
    with pytest.raises(KeyboardInterrupt):
        train(manifest, out, recipe(), progress=interrupt_at("log", "epoch 1/3"))
    assert (out / PARTIAL / "run.json").exists()
    with pytest.raises(CleanError, match=r"other settings \(lr: 0.01 → 0.02\); run without --resume"):
        train(manifest, out, recipe(lr=2e-2), resume=True)
    # settings that do not change the numbers may differ
    train(manifest, out, recipe(workers=0, cache_max_gb=0.0), resume=True)
    assert not (out / PARTIAL).exists() and (out / "model.safetensors").exists()
    # a plain run after an interrupted one ignores (and removes) the partial work
    with pytest.raises(KeyboardInterrupt):
        train(manifest, out, recipe(), progress=interrupt_at("log", "epoch 2/3"))
    logs = []
    train(manifest, out, recipe(), progress=lambda ev, **kw: logs.append(kw.get("message", "")))
    assert not any("resuming" in x for x in logs) and not (out / PARTIAL).exists()


def test_resume_with_nothing_to_resume_trains_from_scratch(manifest, tmp_path):
    logs = []
    train(manifest, tmp_path / "m", recipe(epochs=1), resume=True,
          progress=lambda ev, **kw: logs.append(kw.get("message", "")))
    assert any("nothing to resume" in x for x in logs)
    assert (tmp_path / "m" / "model.safetensors").exists()


def test_interrupt_before_any_state_leaves_no_partial_folder(manifest, tmp_path):
    out = tmp_path / "m"
    with pytest.raises(KeyboardInterrupt):
        train(manifest, out, recipe(), progress=interrupt_at("advance"))
    assert not (out / PARTIAL).exists()


def test_cli_train_has_resume(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    res = CliRunner().invoke(app, ["train", "--help"])
    assert res.exit_code == 0 and "--resume" in res.output and "--amp" in res.output
