"""Several processes and large datasets: `clean train` / `clean score` under torchrun (2 CPU
processes, gloo) equal one process; streamed images equal the in-memory cache; the GPU-only
code paths (mixed precision, channels_last) at least run on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import ScoreConfig
from pipeline import distributed as D
from pipeline.errors import CleanError
from pipeline.stages.score import score
from pipeline.data.stream import StreamImages, iter_batches, open_split
from pipeline.stages.train import train
from pipeline.training.fit import _local_slice, channel_stats, fit
from pipeline.training.recipe import Recipe, amp_dtype

from .helpers import prepared_folder

ROOT = Path(__file__).resolve().parents[1]

# runs several `clean` commands in one torchrun launch (pays the start-up once); each is the CLI itself
DRIVER = """
import sys
from cli.main import app
cmd = []
for a in sys.argv[1:] + ["+"]:
    if a != "+":
        cmd.append(a)
        continue
    code = app(cmd, standalone_mode=False)
    if code:
        sys.exit(code)
    cmd = []
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_folder(tmp_path_factory.mktemp("dist"), 12)


def _recipe(**kw):
    base = dict(model="small_cnn_bn", epochs=2, batch_size=8, lr=1e-2, seed=0, device="cpu", checkpoint_every=1)
    base.update(kw)
    return Recipe(**base)


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_torchrun_two_processes_equal_one(data, tmp_path):
    """DDP training = one process with the same global batch (a model without BatchNorm or
    dropout, whose numbers do not depend on how a batch is split), and sharded scoring gives
    the same scores.csv."""
    m = data / "data" / "manifest.csv"
    # batch 7 over 22 images: global batches 7, 7, 8 → uneven per-rank slices (4+3, 4+4)
    # SGD: Adam's normalised step would turn float noise in ~0 gradients into lr-sized differences
    opts = ["--model", "test_efficientnet_gn", "--epochs", "2", "--batch-size", "7", "--optimizer", "sgd", "--lr", "0.01",
            "--device", "cpu", "--params", str(tmp_path / "every_epoch.yaml")]
    (tmp_path / "every_epoch.yaml").write_text("train:\n  checkpoint_every: 1\n")  # a checkpoint per epoch
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(tmp_path / "driver.py"),
           "train", "--manifest", str(m), "--out", str(tmp_path / "dist"), *opts, "+",
           "score", str(m), "--model", str(tmp_path / "dist"), "--out", str(tmp_path / "scores_dist"),
           "--batch-size", "5", "--device", "cpu", "--params", str(tmp_path / "every_epoch.yaml")]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("trained test_efficientnet_gn") == 1  # only rank 0 prints

    one = tmp_path / "one"
    train(m, one, Recipe(model="test_efficientnet_gn", epochs=2, batch_size=7, optimizer="sgd", lr=0.01, device="cpu",
                         checkpoint_every=1))
    a, b = load_file(str(one / "model.safetensors")), load_file(str(tmp_path / "dist" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert not torch.equal(a["conv_stem.weight"], load_file(str(one / "checkpoints/epoch_001.safetensors"))["conv_stem.weight"])
    da, db = np.load(one / "dynamics.npz"), np.load(tmp_path / "dist" / "dynamics.npz")
    for k in ("ids", "labels", "track_ids", "lr"):
        np.testing.assert_array_equal(da[k], db[k])
    for k in ("loss", "margin", "p_label", "track_grad_norm"):
        np.testing.assert_allclose(db[k], da[k], rtol=1e-3, atol=1e-4, err_msg=k)
    assert (da["p_label"] > 0).all() and (db["p_label"] > 0).all()  # every sample recorded every epoch
    ha = json.loads((one / "config.json").read_text())["history"]
    hb = json.loads((tmp_path / "dist" / "config.json").read_text())["history"]
    assert [r["epoch"] for r in hb] == [1, 2] and "val_accuracy" in hb[-1]
    assert hb[-1]["val_loss"] == pytest.approx(ha[-1]["val_loss"], rel=1e-3, abs=1e-5)

    # scoring the same model in one process
    score(tmp_path / "dist", m, tmp_path / "scores_one", ScoreConfig(batch_size=5, device="cpu", subset="all"))
    s1, s2 = pd.read_csv(tmp_path / "scores_one/scores.csv"), pd.read_csv(tmp_path / "scores_dist/scores.csv")
    assert list(s1.columns) == list(s2.columns) and len(s1) == 22
    assert s1["id"].tolist() == s2["id"].tolist() and s1["pred"].tolist() == s2["pred"].tolist()
    for c in ("loss", "grad_norm", "el2n", "margin", "aum", "forgetting", "confidence", "variability", "self_influence"):
        np.testing.assert_allclose(s2[c], s1[c], rtol=1e-5, atol=1e-12, err_msg=c)
    assert json.loads((tmp_path / "scores_dist/meta.json").read_text())["processes"] == 2


def test_rank_slices_and_shards_cover_everything():
    for n, world in [(7, 2), (8, 3), (2, 4), (1, 2), (23, 4)]:
        parts = [D.even_split(n, world, r) for r in range(world)]
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(parts[i][1] == parts[i + 1][0] for i in range(world - 1))
        assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1
    batch = np.array([5, 3, 9])
    got = [_local_slice(batch, 2, r) for r in range(2)]
    assert [g[0].tolist() for g in got] == [[5, 3], [9]] and [g[1] for g in got] == [1.0, 1.0]
    idx, w = _local_slice(batch, 4, 3)  # a rank without samples runs one with weight 0
    assert idx.tolist() == [5] and w == 0.0
    # scoring shards are cut at batch boundaries
    assert [D.shard(23, 5, 2, r) for r in range(2)] == [(0, 15), (15, 23)]
    assert [D.shard(3, 5, 2, r) for r in range(2)] == [(0, 3), (3, 3)]
    assert D.shard(10, 4) == (0, 10) and not D.enabled() and D.is_main()  # one process


def test_streamed_images_equal_the_in_memory_cache(data, tmp_path):
    m = data / "data" / "manifest.csv"
    mem = open_split(m, "train", cache_max_gb=4)
    streamed = open_split(m, "train", cache_max_gb=0, workers=2)
    assert isinstance(streamed.images, StreamImages) and isinstance(mem.images, np.ndarray)
    assert streamed.images.shape == mem.images.shape
    np.testing.assert_array_equal(streamed.images[np.array([3, 0, 7])], mem.images[[3, 0, 7]])
    keys = [slice(0, 5), np.array([9, 2]), slice(5, 22)]
    for a, b in zip(iter_batches(streamed.images, keys), (mem.images[k] for k in keys)):  # 2 worker processes
        np.testing.assert_array_equal(np.asarray(a), b)
    assert channel_stats(streamed.images) == channel_stats(mem.images)

    a = fit(mem.images, mem.labels, 3, _recipe(), val=(mem.images[:5], mem.labels[:5]))
    for workers in (0, 1):
        s = open_split(m, "train", cache_max_gb=0, workers=workers)
        b = fit(s.images, s.labels, 3, _recipe(), val=(s.images.subset(0, 5), s.labels[:5]))
        sa, sb = a.model.state_dict(), b.model.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        for k in a.dynamics:
            np.testing.assert_array_equal(a.dynamics[k], b.dynamics[k])
        assert a.history == b.history

    train(m, tmp_path / "model", _recipe())
    x = score(tmp_path / "model", m, tmp_path / "s_mem", ScoreConfig(device="cpu", batch_size=5, subset="all"))
    y = score(tmp_path / "model", m, tmp_path / "s_stream",
              ScoreConfig(device="cpu", batch_size=5, subset="all", cache_max_gb=0, workers=2))
    pd.testing.assert_frame_equal(x, y)
    assert json.loads((tmp_path / "s_stream/meta.json").read_text())["streamed"] is True
    with np.load(tmp_path / "s_mem/embeddings.npz") as a, np.load(tmp_path / "s_stream/embeddings.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:  # features from the streamed scoring pass too
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_channel_stats_match_the_direct_formula():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(50, 3, 5, 4), dtype=np.uint8)
    mean, std = channel_stats(x)
    f = x.astype(np.float64) / 255
    np.testing.assert_allclose(mean, f.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, f.std(axis=(0, 2, 3)), rtol=1e-12)
    assert channel_stats(np.full((4, 1, 3, 3), 7, np.uint8))[1] == [1.0]  # constant images: std 1


def test_gpu_code_paths_run_on_cpu(data, monkeypatch):
    assert amp_dtype("auto", "cpu") is None and amp_dtype("off", "cuda") is None
    assert amp_dtype("bf16", "cpu") is torch.bfloat16
    with pytest.raises(CleanError, match="fp16 needs a CUDA GPU"):
        amp_dtype("fp16", "cpu")
    mem = open_split(data / "data" / "manifest.csv", "train")
    r = fit(mem.images, mem.labels, 3, _recipe(epochs=1, amp="bf16"))  # autocast on CPU (bfloat16)
    assert all(torch.isfinite(v).all() for v in r.model.state_dict().values() if v.is_floating_point())
    assert r.dynamics["loss"].dtype == np.float32 and (r.dynamics["p_label"] > 0).all()
    ref = fit(mem.images, mem.labels, 3, _recipe(epochs=1, optimizer="sgd"))  # Adam would amplify ~0 gradients
    import pipeline.training.fit as T

    monkeypatch.setattr(T, "_channels_last", lambda device: True)  # NHWC, as on CUDA
    nhwc = fit(mem.images, mem.labels, 3, _recipe(epochs=1, optimizer="sgd"))
    for k, v in ref.model.state_dict().items():
        torch.testing.assert_close(nhwc.model.state_dict()[k], v, rtol=1e-4, atol=1e-5)


def test_params_for_scale_are_validated(tmp_path):
    from pipeline.params import validate

    p = validate({"data": {"cache_max_gb": 0}, "train": {"amp": "bf16", "workers": 0}})
    r = Recipe.from_params(p)
    assert (r.cache_max_gb, r.amp, r.workers) == (0.0, "bf16", 0)
    with pytest.raises(CleanError, match="train.amp = 'fp8' is not allowed"):
        validate({"train": {"amp": "fp8"}})
    with pytest.raises(CleanError, match="data.cache_max_gb must be ≥ 0"):
        validate({"data": {"cache_max_gb": -1}})
    with pytest.raises(CleanError, match="train.workers must be ≥ 0"):
        validate({"train": {"workers": -2}})
