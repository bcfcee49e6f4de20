"""The prepare stage end to end on tiny sources."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import CleanError
from pipeline.data.images import load_images
from pipeline.stages.prepare import prepare
from pipeline.config import PrepareConfig

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _folder(root, save_image, per_class=6):
    for c, name in enumerate(["ant", "bee", "cow"]):
        for i in range(per_class):
            save_image(root / name / f"{i}.png", hw=(5, 7), mode="RGB" if c == 0 else "L", seed=10 * c + i)
    (root / "bee" / "broken.png").write_bytes(b"")
    (root / "cow" / "junk.jpg").write_text("junk")


def test_prepare_imagefolder_writes_contract_files(tmp_path, save_image):
    root = tmp_path / "images"
    _folder(root, save_image)
    out = tmp_path / "data"
    summary = prepare(out, PrepareConfig(source="imagefolder", root=root, val_frac=1 / 6, test_frac=1 / 6, seed=0))

    rows = _rows(out / "manifest.csv")
    assert rows[0] == ["id", "path", "label", "split"]
    body = rows[1:]
    assert [int(r[0]) for r in body] == list(range(18))
    assert all(os.path.isabs(r[1]) for r in body)  # images live outside data/
    assert body[0][1] == str(root / "ant" / "0.png")
    assert [r[1] for r in body] == sorted(r[1] for r in body)  # no official split: sorted by path
    assert {r[2] for r in body} == {"0", "1", "2"}
    for c in "012":
        assert sorted(r[3] for r in body if r[2] == c) == ["test"] + ["train"] * 4 + ["val"]

    meta = json.loads((out / "classes.json").read_text())
    assert meta == {"classes": ["ant", "bee", "cow"], "source": "imagefolder", "in_chans": 3,
                    "image_size": [5, 7], "uniform_size": True, "num_samples": 18,
                    "counts": {"train": 12, "val": 3, "test": 3}}
    probs = _rows(out / "problems.csv")
    assert probs[0] == ["path", "reason"]
    assert sorted(probs[1:]) == [[str(root / "bee" / "broken.png"), "empty file (0 bytes)"],
                                 [str(root / "cow" / "junk.jpg"), "not an image (unrecognised format)"]]
    assert summary["n_problems"] == 2 and summary["n_noisy"] == 0
    assert summary["counts"] == meta["counts"] and summary["per_class"] == {"ant": 6, "bee": 6, "cow": 6}

    x = load_images([r[1] for r in body], out)
    assert x.shape == (18, 3, 5, 7)
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "images", "manifest.csv", "problems.csv"]


def test_prepare_is_byte_identical_and_leaves_sources_alone(tmp_path, save_image):
    root = tmp_path / "images"
    _folder(root, save_image)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    out = tmp_path / "data"
    args = dict(val_frac=0.2, test_frac=0.2, seed=1, noise_rate=0.3)
    prepare(out, PrepareConfig(source="imagefolder", root=root, **args))
    first = {n: (out / n).read_bytes() for n in ("manifest.csv", "classes.json", "problems.csv")}
    prepare(out, PrepareConfig(source="imagefolder", root=root, **args))
    assert first == {n: (out / n).read_bytes() for n in first}
    assert before == {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_prepare_noise_only_touches_train(tmp_path, save_image):
    root = tmp_path / "images"
    _folder(root, save_image, per_class=20)
    out = tmp_path / "data"
    summary = prepare(out,
                      PrepareConfig(source="imagefolder", root=root, val_frac=0.2, test_frac=0.2, seed=0,
                                    noise_rate=0.25, noise_kind="pairs", noise_pairs={"ant": "bee", 1: 2}))
    rows = _rows(out / "manifest.csv")
    assert rows[0] == ["id", "path", "label", "split", "orig_label", "noisy"]
    body = [dict(zip(rows[0], r)) for r in rows[1:]]
    train = [r for r in body if r["split"] == "train"]
    noisy = [r for r in body if r["noisy"] == "1"]
    eligible = [r for r in train if r["orig_label"] in ("0", "1")]
    assert len(noisy) == summary["n_noisy"] == round(0.25 * len(eligible))
    assert all(r["split"] == "train" for r in noisy)
    assert all(r["label"] == r["orig_label"] for r in body if r["noisy"] == "0")
    assert {(r["orig_label"], r["label"]) for r in noisy} <= {("0", "1"), ("1", "2")}
    with pytest.raises(CleanError, match="noise.pairs: 'pig' is not a class"):
        prepare(out,
                PrepareConfig(source="imagefolder", root=root, val_frac=0.2, test_frac=0.2, seed=0, noise_rate=0.25,
                              noise_kind="pairs", noise_pairs={"pig": 0}))


def test_prepare_noise_in_every_split_keeps_the_truth_and_the_train_only_default(tmp_path, save_image):
    root = tmp_path / "images"
    _folder(root, save_image, per_class=20)
    prepare(tmp_path / "a",
            PrepareConfig(source="imagefolder", root=root, val_frac=0.2, test_frac=0.2, seed=0, noise_rate=0.3))
    default = _rows(tmp_path / "a/manifest.csv")
    prepare(tmp_path / "b",
            PrepareConfig(source="imagefolder", root=root, val_frac=0.2, test_frac=0.2, seed=0, noise_rate=0.3,
                          noise_splits=["train"]))
    assert _rows(tmp_path / "b/manifest.csv") == default  # naming the default changes nothing
    s = prepare(tmp_path / "c",
                PrepareConfig(source="imagefolder", root=root, val_frac=0.2, test_frac=0.2, seed=0, noise_rate=0.3,
                              noise_splits=["train", "val", "test"]))
    rows = _rows(tmp_path / "c/manifest.csv")
    body = [dict(zip(rows[0], r)) for r in rows[1:]]
    assert s["n_noisy"] == sum(r["noisy"] == "1" for r in body) == round(0.3 * len(body))
    assert {r["split"] for r in body if r["noisy"] == "1"} == {"train", "val", "test"}
    assert all((r["label"] != r["orig_label"]) == (r["noisy"] == "1") for r in body)


def test_prepare_digits_paths_relative_to_manifest(tmp_path):
    out = tmp_path / "data"
    summary = prepare(out, PrepareConfig(source="digits", root=None, val_frac=0.1, test_frac=0.2, seed=0))
    rows = _rows(out / "manifest.csv")[1:]
    assert len(rows) == 1797 and summary["num_classes"] == 10
    assert rows[0][1] == "images/digits/0/0000.png"
    assert summary["counts"] == {"train": 1258, "val": 180, "test": 359}
    meta = json.loads((out / "classes.json").read_text())
    assert (meta["in_chans"], meta["image_size"], meta["classes"][:2]) == (1, [8, 8], ["0", "1"])
    assert _rows(out / "problems.csv") == [["path", "reason"]]
    x = load_images([r[1] for r in rows[:3]], out)
    assert x.shape == (3, 1, 8, 8) and x.max() > 200


def test_prepare_idx_official_test_kept(tmp_path, fashion_dir):
    out = tmp_path / "data"
    summary = prepare(out,
                      PrepareConfig(source="fashion-mnist", root=fashion_dir, val_frac=0.25, test_frac=0.5, seed=0))
    assert summary["counts"] == {"train": 9, "val": 3, "test": 5}
    rows = _rows(out / "manifest.csv")[1:]
    tests = [r for r in rows if r[3] == "test"]
    img = os.path.abspath(fashion_dir / "t10k-images-idx3-ubyte.gz")
    assert [r[1] for r in tests] == [f"{img}#{i}" for i in range(5)]
    assert [r[2] for r in tests] == ["0", "1", "2", "3", "4"]
    x = load_images([r[1] for r in rows], out)
    assert x.shape == (17, 1, 4, 4)


@pytest.mark.skipif(not FASHION.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_prepare_real_fashion_mnist(tmp_path):
    summary = prepare(tmp_path, PrepareConfig(source="fashion-mnist", root=None, val_frac=0.1, test_frac=0.2, seed=0))
    assert summary["counts"] == {"train": 54000, "val": 6000, "test": 10000}
    assert summary["n_problems"] == 0 and summary["image_size"] == [28, 28]
    meta = json.loads((tmp_path / "classes.json").read_text())
    assert meta["classes"][0] == "T-shirt/top" and meta["num_samples"] == 70000
    rows = _rows(tmp_path / "manifest.csv")
    x = load_images([rows[1][1], rows[-1][1]], tmp_path)
    assert x.shape == (2, 1, 28, 28) and x.dtype == np.uint8


@pytest.mark.parametrize("source", ["imagefolder", "csv"])
def test_prepare_opens_and_decodes_each_file_exactly_once(tmp_path, save_image, monkeypatch, source):
    """Checking a folder costs one open + one decode per file (the 1M-file target): no header
    pass before the decode, no second decode for sizes or modes."""
    from collections import Counter

    from PIL import Image, ImageFile

    root = tmp_path / "images"
    _folder(root, save_image)
    if source == "csv":
        files = sorted(p for p in root.rglob("*") if p.is_file())
        (tmp_path / "list.csv").write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in files))
    opened, decoded = Counter(), Counter()
    real_open, real_load = Image.open, ImageFile.ImageFile.load

    def counting_open(fp, *a, **k):
        opened[str(fp)] += 1
        return real_open(fp, *a, **k)

    def counting_load(self):
        decoded[self.filename] += 1
        return real_load(self)

    monkeypatch.setattr(Image, "open", counting_open)
    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    prepare(tmp_path / "data",
            PrepareConfig(source=source, root=root if source == "imagefolder" else tmp_path / "list.csv",
                          val_frac=0.2, test_frac=0.2, seed=0))
    images = {str(p) for p in root.rglob("*.png")} | {str(p) for p in root.rglob("*.jpg")}
    assert set(opened) == images and set(opened.values()) == {1}, opened
    good = {f for f in images if "broken" not in f and "junk" not in f}
    assert set(decoded) == good and set(decoded.values()) == {1}, decoded


def test_prepare_with_worker_processes_writes_the_same_files(tmp_path, save_image, monkeypatch):
    """Large folders are checked by worker processes (pipeline/data/pool.py PARALLEL_MIN): the three files
    are byte-identical to one process checking them, broken files included."""
    import pipeline.data.pool as P

    root = tmp_path / "images"
    _folder(root, save_image, per_class=40)
    prepare(tmp_path / "serial", PrepareConfig(source="imagefolder", root=root, val_frac=0.2, test_frac=0.2, seed=0))
    monkeypatch.setattr(P, "PARALLEL_MIN", 1)
    monkeypatch.setattr(P, "CHUNK", 7)  # several chunks, several in flight
    monkeypatch.setattr(P, "workers", lambda: 2)  # two workers even on one CPU
    prepare(tmp_path / "workers", PrepareConfig(source="imagefolder", root=root, val_frac=0.2, test_frac=0.2, seed=0))
    for f in ("manifest.csv", "classes.json", "problems.csv"):
        assert (tmp_path / "serial" / f).read_bytes() == (tmp_path / "workers" / f).read_bytes(), f
    assert len(_rows(tmp_path / "workers" / "problems.csv")) == 3  # header + the two broken files


def test_decoding_and_header_reads_in_worker_processes_equal_one_process(tmp_path, save_image, monkeypatch):
    """load_images (train, score) and native_sizes (score) use the same worker pool as prepare's
    check: the same arrays and sizes as one process, and a broken file still names itself."""
    import pipeline.data.pool as P
    from pipeline.scores.features import native_sizes

    root = tmp_path / "images"
    _folder(root, save_image, per_class=12)
    good = sorted(str(p) for p in root.rglob("*.png") if p.stat().st_size)
    serial = load_images(good, tmp_path, size=(6, 6), in_chans=3)
    sizes = native_sizes(good, tmp_path)
    monkeypatch.setattr(P, "PARALLEL_MIN", 1)
    monkeypatch.setattr(P, "CHUNK", 5)
    monkeypatch.setattr(P, "workers", lambda: 2)
    np.testing.assert_array_equal(load_images(good, tmp_path, size=(6, 6), in_chans=3), serial)
    for a, b in zip(native_sizes(good, tmp_path), sizes):
        np.testing.assert_array_equal(a, b)
    assert sizes[0].tolist() == [5] * len(good) and sizes[1].tolist() == [7] * len(good)
    with pytest.raises(CleanError, match=r"cannot read image .*broken\.png: empty file"):
        load_images(good[:9] + [str(root / "bee" / "broken.png")] + good[9:], tmp_path, size=(6, 6), in_chans=3)


@pytest.mark.parametrize("source", ["imagefolder", "csv", "fashion-mnist", "digits"])
def test_manifest_paths_relative_inside_the_repository(tmp_path, save_image, fashion_dir, source):
    """Every source inside a repository (a folder holding dvc.yaml/.dvc/.git) is listed relative
    to the manifest's folder, so the repository moved (a clone at another path) still reads
    every image; the same ids, in the same order, as before the move."""
    import shutil

    from pipeline.data.dataset import load_split
    from pipeline.formats.manifest import read_manifest

    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    if source == "imagefolder":
        _folder(repo / "photos", save_image)
        root = "photos"
    elif source == "csv":
        _folder(repo / "photos", save_image)
        (repo / "labels").mkdir()
        lines = [f"../photos/{c}/{i}.png,{c}" for c in ("ant", "bee", "cow") for i in range(6)]
        (repo / "labels" / "all.csv").write_text("path,label\n" + "\n".join(lines) + "\n")
        root = "labels/all.csv"
    elif source == "fashion-mnist":
        shutil.move(fashion_dir, repo / "fm")
        root = "fm"
    else:
        root = None
    old = os.getcwd()
    os.chdir(repo)  # as DVC runs a stage: in the folder of dvc.yaml, data.root relative to it
    try:
        s = prepare(Path("data"), PrepareConfig(source=source, root=root, val_frac=0.2, test_frac=0.2, seed=0))
    finally:
        os.chdir(old)
    assert not any("outside the repository" in w for w in s["warnings"])
    before = read_manifest(repo / "data" / "manifest.csv")
    assert not any(os.path.isabs(p) for p in before["path"]), before["path"].head().tolist()
    if source in ("imagefolder", "csv"):
        assert before["path"].iloc[0] == "../photos/ant/0.png"
    moved = tmp_path / "elsewhere" / "clone"
    shutil.move(repo, moved)
    after = read_manifest(moved / "data" / "manifest.csv")
    assert after["id"].tolist() == before["id"].tolist() and after["path"].tolist() == before["path"].tolist()
    train = load_split(moved / "data" / "manifest.csv", "train")
    assert len(train) == int((after["split"] == "train").sum()) > 0


def test_manifest_paths_outside_the_repository_absolute_with_a_note(tmp_path, save_image):
    """Images outside the repository keep absolute paths, and prepare says how to bring them in."""
    repo = tmp_path / "repo"
    (repo / "dvc.yaml").parent.mkdir()
    (repo / "dvc.yaml").write_text("stages: {}\n")
    _folder(tmp_path / "photos", save_image)
    s = prepare(repo / "data",
                PrepareConfig(source="imagefolder", root=tmp_path / "photos", val_frac=0.2, test_frac=0.2, seed=0))
    body = _rows(repo / "data" / "manifest.csv")[1:]
    assert all(os.path.isabs(r[1]) for r in body)
    note = [w for w in s["warnings"] if "outside the repository" in w]
    assert len(note) == 1 and "18 image(s)" in note[0] and str(repo) in note[0]
    assert "copy the folder under data/" in note[0] and "dvc add" in note[0]
