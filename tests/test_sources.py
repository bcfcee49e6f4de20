"""Sources (imagefolder, csv, fashion-mnist IDX, digits) and image loading."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import CleanError
from pipeline.data.images import load_images, read_idx
from pipeline.data.sources import FASHION_CLASSES, load_source, read_source


def _png_bytes(seed=0, hw=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, hw, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _bad_files(d):
    """Create one broken file of each kind in folder d; returns {name: expected reason start}."""
    d.mkdir(parents=True, exist_ok=True)
    good = _png_bytes()
    (d / "trunc.png").write_bytes(good[: len(good) // 2])
    corrupt = bytearray(good)
    corrupt[100:140] = b"x" * 40
    (d / "corrupt.png").write_bytes(bytes(corrupt))
    (d / "empty.png").write_bytes(b"")
    (d / "text.jpg").write_text("this is not an image")
    return {"trunc.png": "truncated image", "corrupt.png": "corrupt image",
            "empty.png": "empty file (0 bytes)", "text.jpg": "not an image"}


def test_imagefolder_records_problems_and_ignored_files(tmp_path, save_image):
    root = tmp_path / "imgs"
    save_image(root / "cat" / "a.png", seed=1)
    save_image(root / "cat" / "B.JPG", mode="RGB", seed=2, fmt="JPEG")
    save_image(root / "cat" / "sub" / "c.bmp", seed=3)
    save_image(root / "dog" / "d.png", hw=(6, 5), seed=4)
    save_image(root / "dog" / ".hidden.png", seed=5)
    (root / "dog" / "notes.txt").write_text("ignored")
    save_image(root / "stray.png")
    (root / "empty_class").mkdir()
    expected = _bad_files(root / "dog")

    src = load_source("imagefolder", root, tmp_path / "out")
    assert src.classes == ["cat", "dog", "empty_class"]
    got = {(os.path.relpath(r.path, root), r.label) for r in src.records}
    assert got == {("cat/a.png", "cat"), ("cat/B.JPG", "cat"), ("cat/sub/c.bmp", "cat"), ("dog/d.png", "dog")}
    d = next(r for r in src.records if r.path.endswith("d.png"))
    assert (d.mode, d.size, d.split) == ("L", (6, 5), None)
    assert next(r for r in src.records if r.path.endswith("B.JPG")).mode == "RGB"
    reasons = {os.path.relpath(p.path, root): p.reason for p in src.problems}
    assert reasons.pop("stray.png") == "image not inside a class subfolder"
    assert set(reasons) == {f"dog/{n}" for n in expected}
    for name, start in expected.items():
        assert reasons[f"dog/{name}"].startswith(start), reasons[f"dog/{name}"]


def test_imagefolder_fixed_classes_make_unknown_label_problems(tmp_path, save_image):
    root = tmp_path / "imgs"
    save_image(root / "cat" / "a.png")
    save_image(root / "dog" / "b.png")
    save_image(root / "dog" / "c.png")
    records, problems = read_source("imagefolder", root, tmp_path, classes=["cat", "bird"])
    assert [r.label for r in records] == ["cat"]
    assert sorted(os.path.basename(p.path) for p in problems) == ["b.png", "c.png"]
    assert {p.reason for p in problems} == {"unknown label 'dog' (not in data.classes)"}


def test_csv_source_problems(tmp_path, save_image):
    d = tmp_path / "set"
    save_image(d / "img" / "ok1.png", seed=1)
    save_image(d / "img" / "ok2.png", seed=2)
    absolute = save_image(tmp_path / "elsewhere" / "ok3.png", seed=3)
    expected = _bad_files(d / "img")
    lines = ["path,label,extra", "img/ok1.png,cat,x", "img/ok2.png, dog ,y", f"{absolute},cat,z",
             "img/missing.png,cat,", "img/ok1.png,bird,", "img/ok2.png,,", ",cat,", "img/ok2.png,dog,", ""]
    lines += [f"img/{n},cat," for n in expected]
    csv_path = d / "labels.csv"
    csv_path.write_text("\n".join(lines) + "\n")

    src = load_source("csv", csv_path, tmp_path / "out", classes=["cat", "dog"])
    assert [(os.path.basename(r.path), r.label) for r in src.records] == [
        ("ok1.png", "cat"), ("ok2.png", "dog"), ("ok3.png", "cat")]
    assert src.records[2].path == str(absolute)
    reasons = {(os.path.basename(p.path), p.reason) for p in src.problems}
    assert ("missing.png", "file not found") in reasons
    assert ("ok1.png", "unknown label 'bird' (not in data.classes)") in reasons
    assert ("ok2.png", "unknown label (empty)") in reasons
    assert ("labels.csv:8", "empty path") in reasons
    assert ("ok2.png", "duplicate path (already listed on line 3 of labels.csv)") in reasons
    by_name = {os.path.basename(p.path): p.reason for p in src.problems}
    for name, start in expected.items():
        assert by_name[name].startswith(start)
    assert len(src.problems) == 5 + len(expected)

    # without a fixed list, classes are the sorted labels seen (numeric names sort numerically)
    csv2 = d / "num.csv"
    csv2.write_text("label,path\n10,img/ok1.png\n2,img/ok2.png\n")
    assert load_source("csv", csv2, tmp_path).classes == ["2", "10"]


def test_csv_and_kind_errors(tmp_path, save_image):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\na.png,cat\n")
    with pytest.raises(CleanError, match=r"lacks column\(s\) path, label.*found columns \['file', 'class'\]"):
        read_source("csv", bad, tmp_path)
    with pytest.raises(CleanError, match="not found"):
        read_source("csv", tmp_path / "nope.csv", tmp_path)
    with pytest.raises(CleanError, match="digits, fashion-mnist, imagefolder, csv"):
        read_source("parquet", tmp_path, tmp_path)
    only_bad = tmp_path / "only_bad.csv"
    only_bad.write_text("path,label\nmissing.png,cat\n")
    with pytest.raises(CleanError, match="no readable images.*missing.png: file not found"):
        read_source("csv", only_bad, tmp_path)
    (tmp_path / "folder" / "cat").mkdir(parents=True)
    with pytest.raises(CleanError, match="no readable images"):
        read_source("imagefolder", tmp_path / "folder", tmp_path)


def test_fashion_idx_source_and_validation(fashion_dir, write_idx, tmp_path):
    records, problems = read_source("fashion-mnist", fashion_dir, tmp_path)
    assert problems == [] and len(records) == 17
    assert [r.split for r in records] == ["train"] * 12 + ["test"] * 5
    img = os.path.abspath(fashion_dir / "train-images-idx3-ubyte.gz")
    assert records[3].path == f"{img}#3" and records[3].label == FASHION_CLASSES[3]
    assert records[11].label == FASHION_CLASSES[1]
    assert records[0].size == (4, 4)

    # wrong magic (label file where images belong), count mismatch, missing file
    write_idx(fashion_dir / "t10k-images-idx3-ubyte.gz", np.zeros(5))
    with pytest.raises(CleanError, match="t10k-images-idx3-ubyte.gz: not an IDX image file"):
        read_source("fashion-mnist", fashion_dir, tmp_path)
    write_idx(fashion_dir / "t10k-images-idx3-ubyte.gz", np.zeros((4, 4, 4)))
    with pytest.raises(CleanError, match="holds 4 images but .* holds 5 labels"):
        read_source("fashion-mnist", fashion_dir, tmp_path)
    (fashion_dir / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x00\x00\x07\x03garbage")
    with pytest.raises(CleanError, match="t10k-images-idx3-ubyte.gz: bad IDX magic"):
        read_source("fashion-mnist", fashion_dir, tmp_path)
    os.remove(fashion_dir / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(CleanError, match="t10k-images-idx3-ubyte.*apt-get install -y dataset-fashion-mnist"):
        read_source("fashion-mnist", fashion_dir, tmp_path)


def test_read_idx_raw_gz_and_truncated(tmp_path, write_idx):
    arr = np.arange(2 * 3 * 5).reshape(2, 3, 5)
    a = read_idx(write_idx(tmp_path / "a.gz", arr))
    b = read_idx(write_idx(tmp_path / "b", arr, gz=False))
    assert a.shape == (2, 3, 5) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, arr)
    np.testing.assert_array_equal(b, arr)
    raw = (tmp_path / "b").read_bytes()
    (tmp_path / "c").write_bytes(raw[:-3])
    with pytest.raises(CleanError, match="declares shape \\[2, 3, 5\\].*27 data bytes"):
        read_idx(tmp_path / "c")


def test_load_images_idx_and_files(tmp_path, write_idx, save_image):
    arr = np.random.default_rng(0).integers(0, 256, (6, 4, 4)).astype(np.uint8)
    write_idx(tmp_path / "imgs.gz", arr)
    x = load_images(["imgs.gz#5", "imgs.gz#0", f"{tmp_path}/imgs.gz#2"], tmp_path)
    assert x.shape == (3, 1, 4, 4) and x.dtype == np.uint8
    np.testing.assert_array_equal(x[:, 0], arr[[5, 0, 2]])
    x3 = load_images(["imgs.gz#1"], tmp_path, size=(8, 8), in_chans=3)
    assert x3.shape == (1, 3, 8, 8) and (x3[:, 0] == x3[:, 2]).all()
    with pytest.raises(CleanError, match="imgs.gz#9 does not exist"):
        load_images(["imgs.gz#9"], tmp_path)

    save_image(tmp_path / "g.png", hw=(4, 6), seed=1)
    save_image(tmp_path / "c.png", hw=(8, 8), mode="RGB", seed=2)
    y = load_images(["g.png", "c.png"], tmp_path)  # geometry of the first image
    assert y.shape == (2, 1, 4, 6)
    np.testing.assert_array_equal(y[0, 0], np.asarray(Image.open(tmp_path / "g.png")))
    z = load_images(["c.png", "g.png"], tmp_path)
    assert z.shape == (2, 3, 8, 8)
    np.testing.assert_array_equal(z[0], np.asarray(Image.open(tmp_path / "c.png")).transpose(2, 0, 1))
    mixed = load_images(["g.png", "imgs.gz#0"], tmp_path, size=(4, 4))
    np.testing.assert_array_equal(mixed[1, 0], arr[0])

    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(CleanError, match="bad.png: not an image.*clean prepare"):
        load_images(["g.png", "bad.png"], tmp_path)
    assert load_images([], tmp_path, size=(4, 4), in_chans=3).shape == (0, 3, 4, 4)


def test_digits_export_and_rerun_is_cheap(tmp_path):
    from sklearn.datasets import load_digits

    records, problems = read_source("digits", None, tmp_path)
    assert len(records) == 1797 and problems == []
    assert sorted({r.label for r in records}, key=int) == [str(i) for i in range(10)]
    pngs = sorted((tmp_path / "images" / "digits").rglob("*.png"))
    assert len(pngs) == 1797
    d = load_digits()
    r = records[42]
    assert r.path == str(tmp_path / "images" / "digits" / str(d.target[42]) / "0042.png")
    img = np.asarray(Image.open(r.path))
    np.testing.assert_array_equal(img, np.rint(d.images[42] * 255 / 16).astype(np.uint8))

    mtimes = {p: p.stat().st_mtime_ns for p in pngs}
    os.utime(pngs[0], ns=(1, 1))  # an old mtime shows whether it is rewritten
    mtimes[pngs[0]] = 1
    pngs[1].write_bytes(b"stale")  # a damaged export is repaired
    read_source("digits", None, tmp_path)
    assert pngs[0].stat().st_mtime_ns == 1
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items() if p != pngs[1])
    assert Image.open(pngs[1]).size == (8, 8)
    assert not list((tmp_path / "images" / "digits").rglob("*.tmp"))
