"""The user's own splits: ImageFolder train/ val/ test/ subfolders and a CSV `split` column.

Only what is missing is carved (val from train; test from train when there is no test), seeded
and stratified; official images keep their split.
"""
from __future__ import annotations

import csv
import os
from collections import Counter

import pytest

from pipeline.data.sources import load_source
from pipeline.errors import CleanError
from pipeline.stages.prepare import prepare
from pipeline.config import PrepareConfig


def _folder(root, save_image, layout: dict[str, dict[str, int]]):
    """layout {subfolder ('' = flat): {class: n images}} -> root; returns {abs path: subfolder}."""
    where = {}
    seed = 0
    for sub, per_class in layout.items():
        for cls, n in per_class.items():
            for i in range(n):
                seed += 1
                p = save_image(root / sub / cls / f"{i:03d}.png", seed=seed)
                where[os.path.abspath(p)] = sub
    return where


def _rows(out):
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def _by_path(out):
    rows = _rows(out)
    return {os.path.abspath(os.path.join(out, r["path"])): r for r in rows}


def _run(root, out, source="imagefolder", **kw):
    args = dict(val_frac=0.25, test_frac=0.25, seed=0)
    args.update(kw)
    return prepare(out, PrepareConfig(source=source, root=str(root), **args))


def test_flat_folder_is_carved_as_before(tmp_path, save_image):
    _folder(tmp_path / "imgs", save_image, {"": {"cat": 8, "dog": 8}})
    s = _run(tmp_path / "imgs", tmp_path / "out")
    assert s["counts"] == {"train": 8, "val": 4, "test": 4}
    per = Counter((r["label"], r["split"]) for r in _rows(tmp_path / "out"))
    assert per[("0", "test")] == per[("1", "test")] == 2  # stratified
    assert s["warnings"] == []


def test_train_and_test_keep_test_and_carve_val_from_train(tmp_path, save_image):
    where = _folder(tmp_path / "imgs", save_image, {"train": {"cat": 8, "dog": 8}, "test": {"cat": 3, "dog": 2}})
    s = _run(tmp_path / "imgs", tmp_path / "out")
    rows = _by_path(tmp_path / "out")
    assert s["counts"] == {"train": 12, "val": 4, "test": 5}
    for p, sub in where.items():
        assert (rows[p]["split"] == "test") == (sub == "test"), p
    val = [r for p, r in rows.items() if r["split"] == "val"]
    assert all(where[p] == "train" for p, r in rows.items() if r["split"] == "val")
    assert Counter(r["label"] for r in val) == {"0": 2, "1": 2}


def test_train_val_test_are_all_kept(tmp_path, save_image):
    where = _folder(tmp_path / "imgs", save_image,
                    {"train": {"a": 5, "b": 5}, "val": {"a": 2, "b": 1}, "test": {"a": 1, "b": 3}})
    s = _run(tmp_path / "imgs", tmp_path / "out")
    assert s["counts"] == {"train": 10, "val": 3, "test": 4}
    rows = _by_path(tmp_path / "out")
    assert {p: r["split"] for p, r in rows.items()} == where


@pytest.mark.parametrize("name", ["valid", "validation", "Val"])
def test_train_and_valid_keep_val_and_carve_test_from_train(tmp_path, save_image, name):
    where = _folder(tmp_path / "imgs", save_image, {"Train": {"a": 8, "b": 8}, name: {"a": 2, "b": 2}})
    s = _run(tmp_path / "imgs", tmp_path / "out")
    rows = _by_path(tmp_path / "out")
    assert s["counts"] == {"train": 12, "val": 4, "test": 4}
    for p, sub in where.items():
        assert (rows[p]["split"] == "val") == (sub == name)
        if rows[p]["split"] == "test":
            assert sub == "Train"


def test_train_only_carves_both(tmp_path, save_image):
    _folder(tmp_path / "imgs", save_image, {"train": {"a": 8, "b": 8}})
    src = load_source("imagefolder", tmp_path / "imgs", tmp_path / "out")
    assert {r.split for r in src.records} == {"train"} and src.classes == ["a", "b"]
    s = _run(tmp_path / "imgs", tmp_path / "out")
    assert s["counts"] == {"train": 8, "val": 4, "test": 4}


def test_classes_present_only_in_some_splits(tmp_path, save_image):
    _folder(tmp_path / "imgs", save_image,
            {"train": {"cat": 6, "dog": 6, "owl": 4}, "val": {"cat": 2}, "test": {"cat": 2, "dog": 1, "fox": 1}})
    s = _run(tmp_path / "imgs", tmp_path / "out")
    assert s["num_classes"] == 4
    assert s["per_class_split"]["fox"] == {"train": 0, "val": 0, "test": 1}
    assert s["per_class_split"]["owl"] == {"train": 4, "val": 0, "test": 0}
    assert s["per_class_split"]["cat"] == {"train": 6, "val": 2, "test": 2}
    assert s["counts"] == {"train": 16, "val": 2, "test": 4}


@pytest.mark.parametrize("empty", ["folder", "class-folder"])
def test_empty_split_folder_is_carved_with_a_note(tmp_path, save_image, empty):
    root = tmp_path / "imgs"
    _folder(root, save_image, {"train": {"a": 8, "b": 8}, "val": {"a": 1, "b": 1}})
    (root / "test" / ("a" if empty == "class-folder" else "")).mkdir(parents=True)
    s = _run(root, tmp_path / "out")
    assert s["counts"] == {"train": 12, "val": 2, "test": 4}
    assert any("test/ holds no readable image" in w and "carved" in w for w in s["warnings"]), s["warnings"]


def test_layout_errors_and_stray_images(tmp_path, save_image):
    root = tmp_path / "mixed"
    _folder(root, save_image, {"train": {"a": 2, "b": 2}, "": {"cat": 1}})
    with pytest.raises(CleanError, match="split folders.*other folders.*cat"):
        load_source("imagefolder", root, tmp_path / "o")
    root = tmp_path / "twice"
    _folder(root, save_image, {"train": {"a": 2, "b": 2}, "val": {"a": 1}, "valid": {"b": 1}})
    with pytest.raises(CleanError, match="both val/ and valid/"):
        load_source("imagefolder", root, tmp_path / "o")
    root = tmp_path / "notrain"
    (root / "train" / "a").mkdir(parents=True)
    _folder(root, save_image, {"test": {"a": 2, "b": 2}})
    with pytest.raises(CleanError, match="train holds no readable image"):
        load_source("imagefolder", root, tmp_path / "o")
    root = tmp_path / "stray"
    _folder(root, save_image, {"train": {"a": 2, "b": 2}})
    save_image(root / "train" / "loose.png")
    save_image(root / "top.png")
    src = load_source("imagefolder", root, tmp_path / "o")
    reasons = {os.path.basename(p.path): p.reason for p in src.problems}
    assert reasons["loose.png"] == "image not inside a class subfolder"
    assert reasons["top.png"].startswith("image not inside a split's class subfolder")


def test_fixed_classes_apply_in_every_split(tmp_path, save_image):
    _folder(tmp_path / "imgs", save_image, {"train": {"a": 4, "b": 4, "c": 1}, "test": {"a": 1, "c": 1}})
    src = load_source("imagefolder", tmp_path / "imgs", tmp_path / "o", classes=["a", "b"])
    assert Counter(r.split for r in src.records) == {"train": 8, "test": 1}
    assert sorted(p.reason for p in src.problems) == ["unknown label 'c' (not in data.classes)"] * 2


def _csv(tmp_path, save_image, lines: list[str]):
    d = tmp_path / "set"
    for i in range(12):
        save_image(d / "img" / f"{i}.png", seed=i)
    (d / "list.csv").write_text("\n".join(lines) + "\n")
    return d / "list.csv"


def test_csv_split_column(tmp_path, save_image):
    lines = ["path,label,split"]
    lines += [f"img/{i}.png,{'ab'[i % 2]},train" for i in range(8)]
    lines += ["img/8.png,a,test", "img/9.png,b,TEST", "img/10.png,a,validation", "img/11.png,b,holdout"]
    path = _csv(tmp_path, save_image, lines)
    s = _run(path, tmp_path / "out", source="csv")
    rows = {os.path.basename(r["path"]): r["split"] for r in _rows(tmp_path / "out")}
    assert s["counts"] == {"train": 8, "val": 1, "test": 2}  # official val and test: nothing carved
    assert rows["8.png"] == rows["9.png"] == "test" and rows["10.png"] == "val"
    assert "11.png" not in rows
    with open(tmp_path / "out" / "problems.csv", newline="") as f:
        probs = {os.path.basename(r["path"]): r["reason"] for r in csv.DictReader(f)}
    assert probs["11.png"].startswith("unknown split 'holdout'")


def test_csv_split_column_partial_and_absent(tmp_path, save_image):
    lines = ["path,label,split"] + [f"img/{i}.png,{'ab'[i % 2]}," for i in range(10)]
    lines += ["img/10.png,a,test", "img/11.png,b,test"]
    path = _csv(tmp_path, save_image, lines)
    s = _run(path, tmp_path / "out", source="csv")
    assert s["counts"] == {"train": 7, "val": 3, "test": 2}  # empty cells: the pool val is carved from
    lines = ["path,label"] + [f"img/{i}.png,{'ab'[i % 2]}" for i in range(12)]
    path = _csv(tmp_path, save_image, lines)
    s = _run(path, tmp_path / "out2", source="csv")
    assert s["counts"] == {"train": 6, "val": 3, "test": 3}


def test_carving_is_seeded_and_deterministic(tmp_path, save_image):
    _folder(tmp_path / "imgs", save_image, {"train": {"a": 10, "b": 10}, "test": {"a": 2, "b": 2}})
    _run(tmp_path / "imgs", tmp_path / "o1", seed=3)
    _run(tmp_path / "imgs", tmp_path / "o2", seed=3)
    _run(tmp_path / "imgs", tmp_path / "o3", seed=4)
    a, b, c = ((tmp_path / o / "manifest.csv").read_text() for o in ("o1", "o2", "o3"))
    assert a == b
    assert a != c
