"""Hostile inputs, round 3 (issue 21): no command writes into the source images, decisions follow
their image, the review page and server survive hostile data, reads are bounded, bad values and
full disks are the user's problem named as such, and late checks come early.

Shares the scored tiny project of tests/helpers.py (3 classes x 10 images in data/imgs, 1 epoch);
each test works on its own copy, so every case costs seconds.
"""
from __future__ import annotations

from pathlib import Path

import inspect
import typing
import pytest
import typer

from .helpers import TINY_PARAMS, invoke, project_fixtures
from .test_hostile import snapshot, changed, refused, one_line_error

_debug, base, proj = project_fixtures("hostile3", TINY_PARAMS)


# --------------------------------------------------------------------------- 1. no write into the images

#: values for the required parameters of a command (a new required one must be added here)
REQUIRED = {"scores_a": "scores/scores.csv", "scores_b": "scores/scores.csv", "strategy": "random",
            "keep": "0.5", "out": "sweep/p"}
#: (command, parameter) pairs that only read, for which a source image or folder is input that the
#: command may accept (an optional input it skips, an image folder to score)
READS = {("score", "path"), ("report", "metrics"), ("report", "plots"), ("report", "sweep"),
         ("report", "dynamics"), ("report", "prune_summary"), ("figures", "dynamics"),
         ("figures", "sweep"), ("figures", "confusion"), ("report", "compare"), ("show", "flags"),
         ("report", "flags"), ("sweep collect", "sweep_dir"), ("figures", "scores"), ("figures", "manifest"),
         ("flag", "model"), ("report", "params"), ("sweep point", "flags"), ("sweep run", "manifest"),
         ("sweep run", "scores"), ("sweep run", "flags")}
#: an image of data.root and its class folder
TARGETS = ["data/imgs/a/000.png", "data/imgs/a"]


def _path_like(annotation) -> bool:
    """Path, Optional[Path], list[Path], ..."""
    return annotation is Path or any(_path_like(a) for a in typing.get_args(annotation))


def _path_params():
    """(command words, command, parameter) for every path-like parameter of every command of the
    app, read from the Typer app and the annotations of its functions."""
    from cli.main import app

    def walk(cmd, words):
        if hasattr(cmd, "commands"):
            for name, sub in sorted(cmd.commands.items()):
                yield from walk(sub, [*words, name])
            return
        hints = typing.get_type_hints(inspect.unwrap(cmd.callback))
        for p in cmd.params:
            if _path_like(hints.get(p.name)):
                yield " ".join(words), cmd, p

    return list(walk(typer.main.get_command(app), []))


PATH_PARAMS = _path_params()


def _args(words: str, cmd, param, value: str) -> list[str]:
    """Command line giving `value` to `param` and REQUIRED values to the other required parameters."""
    args, opts = words.split(), []
    for p in cmd.params:
        if p is param:
            v = value
        elif p.required:
            v = REQUIRED[p.name]
        else:
            continue
        if p.param_type_name == "argument":
            args.append(v)
        else:
            opts += [p.opts[0], v]
    return args + opts


def test_every_command_has_path_options_to_check():
    names = {w for w, _, _ in PATH_PARAMS}
    assert {"prepare", "train", "prune", "figures", "compare", "review", "sweep point", "report"} <= names
    assert len(PATH_PARAMS) >= 40


@pytest.mark.parametrize("words,param", [(w, p.name) for w, _, p in PATH_PARAMS])
def test_no_path_option_of_any_command_writes_into_the_source_images(proj, monkeypatch, words, param):
    """Generated from the CLI itself: every path-like option of every command pointed at a source
    image, its class folder and data.root: refused (exit != 0, nothing changed), or for a pure
    input (READS) nothing to check: a new option is checked unless it is listed there."""
    import pipeline.views.review as review_view

    monkeypatch.setattr(review_view, "wait", lambda server: server.server_close())  # a served review returns
    monkeypatch.setattr("webbrowser.open", lambda *a, **k: True)
    if (words, param) in READS:
        return  # an input only: what the command writes is named by its other options
    cmd, p = next((c, q) for w, c, q in PATH_PARAMS if w == words and q.name == param)
    images = proj / "data/imgs"
    for target in TARGETS:
        before, source = snapshot(proj), snapshot(images)
        res = invoke(proj, *_args(words, cmd, p, target))
        assert snapshot(images) == source, (target, res.output)
        assert res.exit_code != 0, (target, res.output)
        assert snapshot(proj) == before, (target, changed(before, snapshot(proj)))


@pytest.mark.parametrize("args,starts", [
    (["prune", "--out", "data/imgs/a/000.png"], "--out data/imgs/a/000.png lies inside"),
    (["prune", "--summary", "data/imgs/b/002.png"], "--summary data/imgs/b/002.png lies inside"),
    (["figures", "--out", "data/imgs/a"], "--out data/imgs/a/"),
    (["compare", "scores/scores.csv", "scores/scores.csv", "--out", "data/imgs/a/000.png"], "--out data/imgs/a/000.png"),
    (["review", "--decisions", "data/imgs/a/decisions.csv", "--no-browser"], "--decisions data/imgs/a/decisions.csv lies inside"),
])
def test_the_reported_writes_into_the_images_are_refused(proj, args, starts):
    got = refused(proj, args, starts=starts)
    assert "data/imgs" in got and "give" in got


# --------------------------------------------------------------------------- 2. decisions follow their image

def _decide(proj: Path, *decisions) -> None:
    """Decisions made as `clean review` makes them (Review.decide writes data/decisions.csv)."""
    from pipeline.views.review import Review

    r = Review(proj / "data/manifest.csv", proj / "scores/flags.csv", proj / "data/decisions.csv")
    for d in decisions:
        r.decide(d)


def _manifest(proj: Path):
    import pandas as pd

    return pd.read_csv(proj / "data/manifest.csv", keep_default_na=False)


def test_decisions_follow_their_image_when_an_added_image_shifts_the_ids(tmp_path, monkeypatch):
    """Add one image, re-prepare: every later id shifts; the decisions still apply to the images
    the person chose (on main they landed on the neighbours)."""
    from .helpers import TINY_PARAMS, make_imagefolder, ok

    monkeypatch.setenv("CLEAN_DEBUG", "1")
    for split in ("train", "val", "test"):
        make_imagefolder(tmp_path / "data/imgs" / split, n_per_class=4 if split == "train" else 2, seed=len(split))
    (tmp_path / "params.yaml").write_text(TINY_PARAMS)
    for cmd in (["prepare"], ["train"], ["score"], ["flag"]):
        ok(invoke(tmp_path, *cmd))
    m = _manifest(tmp_path)
    flagged = set(__import__("pandas").read_csv(tmp_path / "scores/flags.csv").query("flagged == 1")["id"])
    tr = m[(m["split"] == "train") & m["id"].isin(flagged)]
    drop, relabel = tr.iloc[-1], tr.iloc[-2]  # late ids: the added image shifts them
    _decide(tmp_path, {"id": int(drop["id"]), "action": "drop"},
            {"id": int(relabel["id"]), "action": "relabel", "label": "c" if relabel["label"] != 2 else "a"})
    new_label = 2 if relabel["label"] != 2 else 0
    from PIL import Image

    Image.open(tmp_path / "data/imgs/train/a/000.png").save(tmp_path / "data/imgs/train/a/0000.png")  # sorts first
    for cmd in (["prepare"], ["train"], ["score"], ["flag"], ["prune", "--strategy", "random", "--keep", "1.0"]):
        ok(invoke(tmp_path, *cmd))
    m2 = _manifest(tmp_path)
    assert int(m2.set_index("path").loc[drop["path"], "id"]) != int(drop["id"])  # the ids did shift
    pruned = __import__("pandas").read_csv(tmp_path / "data/pruned.csv", keep_default_na=False).set_index("path")
    assert drop["path"] not in pruned.index  # the chosen image is dropped ...
    assert int(pruned.loc[relabel["path"], "label"]) == new_label  # ... and the other one relabelled
    assert len(pruned) == len(m2) - 1 and (pruned["label"] != pruned["orig_label"]).sum() == 1  # nobody else


def test_a_decision_whose_image_left_the_manifest_is_refused(proj):
    m = _manifest(proj)
    row = m[m["split"] == "train"].iloc[0]
    (proj / "data/decisions.csv").write_text(f"id,path,action,label,note\n{row['id']},imgs/gone/1.png,drop,,\n")
    refused(proj, ["prune"], f"data/decisions.csv: row 2: image 'imgs/gone/1.png' (id {row['id']} when decided) is "
                             "no longer in data/manifest.csv; remove the row (the image left the dataset) or put "
                             "the image back")


def test_old_decisions_without_paths_work_until_the_manifest_changes(proj):
    import os

    m = _manifest(proj)
    rid = int(m[m["split"] == "train"]["id"].iloc[0])
    (proj / "data/decisions.csv").write_text(f"id,action,label,note\n{rid},drop,,\n")
    ok = invoke(proj, "prune")
    assert ok.exit_code == 0, ok.output
    assert rid not in set(__import__("pandas").read_csv(proj / "data/pruned.csv")["id"])
    later = os.stat(proj / "data/decisions.csv").st_mtime + 10
    os.utime(proj / "data/manifest.csv", (later, later))  # prepare ran after the decisions were made
    got = refused(proj, ["prune"], starts=f"data/decisions.csv: row 2 (id {rid}) names no image (no path column) "
                                          "and data/manifest.csv was written after it")
    assert "touch data/decisions.csv" in got and "clean review" in got
