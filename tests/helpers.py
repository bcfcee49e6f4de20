"""Tiny datasets for fast tests: a learnable ImageFolder of 8x8 grayscale images."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
from PIL import Image


def make_imagefolder(root: Path, n_per_class: int = 12, classes=("a", "b", "c"), hw=(8, 8), seed=0) -> Path:
    """Write root/<class>/<i>.png where class k has a bright k-th horizontal band (learnable)."""
    rng = np.random.default_rng(seed)
    h, w = hw
    for k, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = rng.integers(0, 60, size=(h, w)).astype(np.uint8)
            band = slice(k * h // len(classes), (k + 1) * h // len(classes))
            img[band, :] = rng.integers(180, 256, size=(band.stop - band.start, w))
            Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


def tiny_arrays(n_per_class: int = 10, classes: int = 3, hw=(8, 8), seed=0):
    """In-memory version of make_imagefolder → (uint8 [N,1,H,W], int labels [N])."""
    rng = np.random.default_rng(seed)
    h, w = hw
    xs, ys = [], []
    for k in range(classes):
        for _ in range(n_per_class):
            img = rng.integers(0, 60, size=(h, w)).astype(np.uint8)
            band = slice(k * h // classes, (k + 1) * h // classes)
            img[band, :] = rng.integers(180, 256, size=(band.stop - band.start, w))
            xs.append(img[None])
            ys.append(k)
    return np.stack(xs), np.array(ys, np.int64)


@contextlib.contextmanager
def cwd(path: Path):
    """Run the block with `path` as the working directory."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


# params.yaml for a tiny ImageFolder at data/imgs: 1 epoch, cheap scores, no grid
TINY_PARAMS = """\
data:
  source: imagefolder
  root: data/imgs
  val_frac: 0.2
  test_frac: 0.2
train:
  epochs: 1
  batch_size: 8
  device: cpu
  seeds: [0]
score:
  params: last
  self_influence: false
flag:
  method: quantile
  quantile: 0.2
  grid: 0
"""


def invoke(where: Path, *args):
    """`clean <args>` in folder `where` through Typer's test runner → its Result."""
    from typer.testing import CliRunner

    from cli.main import app

    with cwd(where):
        return CliRunner().invoke(app, [str(a) for a in args])


def ok(res):
    """The command succeeded (else fail with its output)."""
    assert res.exit_code == 0, res.output
    return res


def scored_project(root: Path, params_text: str) -> Path:
    """root/data/imgs (3 classes x 10 tiny images) + params.yaml → prepare, train, score, flag, with
    CLEAN_DEBUG=1 so a bug fails with its traceback."""
    make_imagefolder(root / "data/imgs", n_per_class=10)
    (root / "params.yaml").write_text(params_text)
    os.environ["CLEAN_DEBUG"] = "1"
    try:
        for cmd in (["prepare"], ["train"], ["score"], ["flag"]):
            ok(invoke(root, *cmd))
    finally:
        os.environ.pop("CLEAN_DEBUG", None)
    return root


def project_fixtures(prefix: str, params_text: str, symlinks: bool = False):
    """Module fixtures (_debug, base, proj) for tests that break a scored project: `base` runs
    :func:`scored_project` once per module, `proj` is a fresh copy of it per test, `_debug`
    (autouse) sets CLEAN_DEBUG=1 so a bug raises with its traceback instead of printing
    `internal error`. Use: ``_debug, base, proj = project_fixtures("name", PARAMS)``."""
    import shutil

    import pytest

    @pytest.fixture(autouse=True)
    def _debug(monkeypatch):
        monkeypatch.setenv("CLEAN_DEBUG", "1")

    @pytest.fixture(scope="module")
    def base(tmp_path_factory):
        return scored_project(tmp_path_factory.mktemp(prefix), params_text)

    @pytest.fixture
    def proj(base, tmp_path) -> Path:
        return Path(shutil.copytree(base, tmp_path / "p", symlinks=symlinks))

    return _debug, base, proj


def prepared_folder(root: Path, n_per_class: int) -> Path:
    """root/imgs (make_imagefolder) prepared into root/data with val 0.2, test 0.2, seed 0 → root."""
    from pipeline.stages.prepare import prepare
    from pipeline.config import PrepareConfig

    make_imagefolder(root / "imgs", n_per_class=n_per_class)
    prepare(root / "data",
            PrepareConfig(source="imagefolder", root=str(root / "imgs"), val_frac=0.2, test_frac=0.2, seed=0))
    return root
