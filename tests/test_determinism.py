"""Same params + seed on CPU → byte-identical outputs: the digits pipeline (prepare → train →
evaluate → score → flag → prune → retrain) run twice via the CLI in two fresh folders.

Timing fields are the only allowed difference: JSON files are compared with every "seconds" /
"samples_per_s" key dropped (metrics.json, scores/meta.json, metrics/flags.json carry them).
dynamics.npz is compared array by array (a zip archive stamps its members with the write time).
Every other file (manifest, classes.json, problems.csv, pruned.csv, scores.csv, flags.csv,
weights, checkpoints, PNGs, confusion CSVs) must match byte for byte.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app

from .helpers import cwd

runner = CliRunner()
TIMING_KEYS = {"seconds", "samples_per_s"}

PARAMS = """\
data:
  source: digits
train:
  epochs: 1
  batch_size: 64
  device: cpu
  seeds: [0]
  track: 32
score:
  params: last
  self_influence: false
flag:
  method: mad
  grid: 16
prune:
  strategy: gradient-cdf
  keep: 0.5
"""

STAGES = [["prepare"], ["train"], ["evaluate"], ["score"], ["flag"], ["prune"], ["retrain"]]


def run_pipeline(root: Path, after_prepare=None) -> None:
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(PARAMS)
    with cwd(root):
        for stage in STAGES:
            res = runner.invoke(app, stage)
            assert res.exit_code == 0, (stage, res.output)
            if stage == ["prepare"] and after_prepare:
                after_prepare()


def drop_timings(obj):
    if isinstance(obj, dict):
        return {k: drop_timings(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [drop_timings(v) for v in obj]
    return obj


def fingerprint(path: Path):
    """What must be identical between the two runs for one file."""
    if path.suffix == ".json":
        return drop_timings(json.loads(path.read_text()))
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: hashlib.sha256(np.ascontiguousarray(z[k]).tobytes()).hexdigest() + str(z[k].dtype)
                    + str(z[k].shape) for k in sorted(z.files)}
    return hashlib.sha256(path.read_bytes()).hexdigest()


def outputs(root: Path) -> dict[str, object]:
    return {str(p.relative_to(root)): fingerprint(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "params.yaml"}


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _debug(monkeypatch):
    monkeypatch.setenv("CLEAN_DEBUG", "1")


def test_same_seed_same_bytes_and_source_images_untouched(tmp_path):
    exported = {}
    a, b = tmp_path / "a", tmp_path / "b"
    run_pipeline(a, after_prepare=lambda: exported.update(snapshot(a / "data/images")))
    # the exported digits are the source images of every later stage: never rewritten or touched,
    # not even by a second prepare
    with cwd(a):
        assert runner.invoke(app, ["prepare"]).exit_code == 0
    assert len(exported) == 1797 and snapshot(a / "data/images") == exported

    run_pipeline(b)
    out_a, out_b = outputs(a), outputs(b)
    for must in ("data/manifest.csv", "data/classes.json", "data/problems.csv", "data/pruned.csv",
                 "scores/scores.csv", "scores/meta.json", "scores/flags.csv", "scores/top_flagged.png",
                 "prune/summary.json", "metrics/base.json", "metrics/pruned.json", "metrics/flags.json",
                 "models/base/model.safetensors", "models/base/metrics.json", "models/base/config.json",
                 "models/base/dynamics.npz", "models/base/checkpoints/epoch_001.safetensors",
                 "models/pruned/model.safetensors", "plots/confusion_base.csv", "plots/confusion_pruned.csv"):
        assert must in out_a, must
    assert sorted(out_a) == sorted(out_b)
    differ = [f for f in out_a if out_a[f] != out_b[f]]
    assert not differ, f"outputs differ between two identical runs: {differ}"
    # the timing fields exist (so dropping them is what made the JSON equal), and they are all there is
    m = json.loads((a / "models/base/metrics.json").read_text())
    assert {"seconds", "samples_per_s"} <= set(m)
    assert 0 < json.loads((a / "prune/summary.json").read_text())["n_kept"] < json.loads(
        (a / "prune/summary.json").read_text())["n_total"]
