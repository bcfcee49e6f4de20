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
#: an image of data.root, its class folder and a new file in that folder
TARGETS = ["data/imgs/a/000.png", "data/imgs/a", "data/imgs/a/new.csv"]
#: inputs that may be missing (then unused): a new file is no target for them
OPTIONAL = {("*", "params"), ("evaluate", "flags"), ("evaluate", "decisions"), ("prune", "decisions"),
            ("flag", "manifest"), ("report", "manifest"), ("report", "scores"), ("review", "scores")}


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
    image, its class folder and a new file in it: refused (exit != 0, nothing changed), or for a pure
    input (READS) nothing to check: a new option is checked unless it is listed there."""
    import pipeline.views.review as review_view

    monkeypatch.setattr(review_view, "wait", lambda server: server.server_close())  # a served review returns
    monkeypatch.setattr("webbrowser.open", lambda *a, **k: True)
    if (words, param) in READS:
        return  # an input only: what the command writes is named by its other options
    cmd, p = next((c, q) for w, c, q in PATH_PARAMS if w == words and q.name == param)
    images = proj / "data/imgs"
    optional = (words, param) in OPTIONAL or ("*", param) in OPTIONAL
    for target in TARGETS[:2] if optional else TARGETS:
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
def test_the_reported_writes_into_the_images_are_refused(proj, monkeypatch, args, starts):
    import pipeline.views.review as review_view

    monkeypatch.setattr(review_view, "wait", lambda server: server.server_close())  # a served review returns
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


# --------------------------------------------------------------------------- 3. the review page and server

HOSTILE_NOTE = "<!--<script>x</script><script>\u2028\u2029 & </SCRIPT"


from .test_review import served  # noqa: E402,F401  (the review server fixture on test_review's tiny project)


def _post(server, r, body):
    import json

    from .test_review import request

    st, text, _ = request(server, "POST", f"/{r.token}/api/decision", body)
    return st, json.loads(text)


def test_page_data_cannot_end_or_comment_out_its_script(served):
    """A note holding `<!--<script>` killed every later page load (the JSON escaped `</` only)."""
    import json
    import re

    P, r, server = served
    first = int(r.items[0]["id"])
    assert _post(server, r, {"id": first, "action": "keep", "note": HOSTILE_NOTE})[0] == 200
    page = r.page().decode()
    m = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S)
    assert "<" not in m.group(1) and "\u2028" not in m.group(1)
    assert json.loads(m.group(1))["decisions"][str(first)]["note"] == " ".join(HOSTILE_NOTE.split())


@pytest.mark.skipif(not Path("/usr/bin/chromedriver").exists(), reason="chromium-driver not installed")
def test_page_with_a_hostile_note_still_runs_in_a_browser(served):
    pytest.importorskip("selenium")
    from selenium.webdriver.common.by import By

    from pipeline.views.review import url

    from .test_review import browser, wait_for

    P, r, server = served
    assert _post(server, r, {"id": int(r.items[0]["id"]), "action": "drop", "note": HOSTILE_NOTE})[0] == 200
    drv = browser(800, 600)
    try:
        drv.get(url(server))
        wait_for(lambda: drv.find_element(By.ID, "progress").text == f"1 of {len(r.items)} reviewed",
                 what="the page's script to run")
    finally:
        drv.quit()


def test_server_answers_hostile_bodies_with_a_json_error(served, monkeypatch):
    import errno

    import pipeline.decisions

    P, r, server = served
    dec = r.decisions_csv
    before = dec.read_bytes()
    st, body = _post(server, r, b"[" * 16000)  # RecursionError in json.loads: no answer at all on main
    assert st == 400 and "valid JSON" in body["error"]
    first = int(r.items[0]["id"])

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline.decisions, "write_csv", full, raising=False)
    monkeypatch.setattr("pipeline.io.write_csv", full)
    st, body = _post(server, r, {"id": first, "action": "drop"})
    assert st == 507 and body["error"].startswith(f"decision not saved: {dec}: no space left on the disk")
    assert dec.read_bytes() == before and r.decisions == {}
    monkeypatch.undo()
    st, body = _post(server, r, b'{"id": %d, "action": "keep", "note": "a\\ud800b"}' % first)  # a lone surrogate
    assert st == 200, body
    assert "a\ufffdb" in dec.read_text(encoding="utf-8")


def test_hand_edits_to_decisions_while_the_server_runs_are_kept(served):
    P, r, server = served
    dec = r.decisions_csv
    a, b, c = (int(it["id"]) for it in r.items[:3])
    assert _post(server, r, {"id": a, "action": "drop"})[0] == 200
    with open(dec, "a", encoding="utf-8") as f:  # the person edits the file by hand
        f.write(f"{b},{r.paths[b]},relabel,c,by hand\n")
    assert _post(server, r, {"id": c, "action": "keep"})[0] == 200
    from pipeline.decisions import read_decisions

    got = read_decisions(dec, r.classes, r.paths)
    assert {k: v["action"] for k, v in got.items()} == {a: "drop", b: "relabel", c: "keep"}
    assert got[b]["note"] == "by hand"
    dec.write_text(dec.read_text() + "garbage,row\n")  # a hand edit that does not read: refused, file kept
    broken = dec.read_bytes()
    st, body = _post(server, r, {"id": a, "action": "keep"})
    assert st == 409 and "was changed outside the review" in body["error"] and "row" in body["error"]
    assert dec.read_bytes() == broken


# --------------------------------------------------------------------------- 6. the user's disk

@pytest.mark.parametrize("code,says", [("ENOSPC", "no space left on the disk"), ("EDQUOT", "the disk quota is used up"),
                                       ("EROFS", "the file system is read-only"), ("EACCES", "permission denied")])
def test_a_full_or_read_only_disk_is_the_users_problem_named_with_its_path(proj, monkeypatch, code, says):
    import errno

    def fail(*a, **k):
        raise OSError(getattr(errno, code), "from the OS")

    monkeypatch.setattr("pipeline.io.tempfile.mkstemp", fail)
    got = refused(proj, ["prune"], starts=f"data/pruned.csv: {says}")
    assert ("MiB free there" in got) == (code in ("ENOSPC", "EDQUOT"))
    assert got.endswith("then run the command again")


@pytest.mark.parametrize("args,file", [(["prepare"], "data/"), (["flag"], "scores/"), (["score"], "scores/"),
                                       (["train", "--out", "models/new"], "models/")])
def test_a_full_disk_names_the_file_of_every_stage(proj, monkeypatch, args, file):
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pipeline.io.tempfile.mkstemp", full)
    got = refused(proj, args, starts=file)
    assert "no space left on the disk" in got


# --------------------------------------------------------------------------- 4. bounded reads

BOMB = "".join(f"{c}: &{c} [" + ",".join([f"*{p}"] * 9 if p else ['"lol"'] * 9) + "]\n"
               for p, c in zip([None, *"abcdefgh"], "abcdefghi")) + "train:\n  seeds: *i\n"


@pytest.mark.parametrize("args", [["prepare"], ["flag"]])
def test_a_yaml_alias_bomb_is_refused_at_once_with_a_short_message(proj, args):
    (proj / "params.yaml").write_text(BOMB)
    got = refused(proj, args, starts="params.yaml: the YAML expands to more than 100,000 values")
    assert len(got) < 300 and "lol" not in got


def _fifo(path: Path) -> Path:
    import os

    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


def test_an_image_that_is_a_fifo_is_a_problem_not_a_hang(proj):
    _fifo(proj / "data/imgs/a/fifo.png")
    res = invoke(proj, "prepare")
    assert res.exit_code == 0, res.output
    assert "imgs/a/fifo.png,\"not a regular file (a pipe, a device or a socket)\"" in (proj / "data/problems.csv").read_text()


def test_review_of_an_image_replaced_by_a_fifo_answers_404(served):
    from .test_review import request

    P, r, server = served
    rid = int(r.items[0]["id"])
    _fifo(r.base / r.paths[rid])
    st, body, _ = request(server, "GET", f"/{r.token}/img/{rid}.png")
    assert st == 404 and "not a regular file" in body


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_decisions_that_are_a_fifo_or_dev_zero_are_refused(proj, kind):
    import os

    dec = proj / "data/decisions.csv"
    if kind == "fifo":
        _fifo(dec)
    else:
        dec.unlink(missing_ok=True)
        os.symlink("/dev/zero", dec)
    refused(proj, ["prune"], "data/decisions.csv is not a regular file (a pipe or a device); decisions must be a CSV file")


# --------------------------------------------------------------------------- 6. values the machine can hold

@pytest.mark.parametrize("yaml_text,args,message", [
    ("train:\n  epochs: 1000000000000\n", ["train"], "train.epochs must be ≥ 1 and ≤ 100000, got 1000000000000"),
    ("flag:\n  outlier_k: 1000000000\n", ["flag"], "flag.outlier_k must be ≥ 1 and ≤ 10000, got 1000000000"),
    ("flag:\n  folds: 1000000\n  method: confident\n", ["flag"], "flag.folds must be ≥ 2 and ≤ 1000, got 1000000"),
    ("data:\n  seed: " + "7" * 1_000_000 + "\n", ["prepare"],
     "line 2: a number of 1,000,000 digits; no setting takes more than 30 (seeds take 10): write a smaller value"),
], ids=["epochs", "outlier_k", "folds", "a million digits"])
def test_values_beyond_what_the_machine_holds_are_refused_in_one_short_line(proj, yaml_text, args, message):
    (proj / "params.yaml").write_text(yaml_text)
    assert refused(proj, args, "params.yaml" + (" " if message.startswith("line") else ": ") + message)


def test_more_folds_than_training_samples_is_refused_before_training(proj):
    (proj / "params.yaml").write_text((proj / "params.yaml").read_text().replace(
        "  method: quantile", "  method: confident\n  folds: 1000"))
    refused(proj, ["flag"], starts="flag.folds = 1000 is more than the 18 training samples")


# --------------------------------------------------------------------------- 5. a linked model folder

def test_train_into_a_symlinked_model_folder_is_refused_and_leaves_nothing(proj):
    import os

    os.symlink("base", proj / "models/link")
    refused(proj, ["train", "--out", "models/link"],
            "--out models/link is a symbolic link (to base); `clean train` replaces its model folder as a whole by "
            "renaming, so give the folder itself (--out models/base) or a new folder")
    assert not (proj / "models/.link.clean-new").exists() and not (proj / "models/.link.clean-new").is_symlink()
    assert (proj / "models/link").is_symlink()


def test_a_link_left_beside_a_model_folder_by_an_older_clean_is_no_obstacle(proj):
    """What the old swap left: models/link a real model folder, the user's link as .link.clean-new."""
    import os
    import shutil

    from .helpers import ok

    shutil.copytree(proj / "models/base", proj / "models/link")
    os.symlink("base", proj / "models/.link.clean-new")
    ok(invoke(proj, "train", "--out", "models/link"))
    assert not os.path.lexists(proj / "models/.link.clean-new")
    assert (proj / "models/base/model.safetensors").is_file()  # the folder the link pointed to is kept


# --------------------------------------------------------------------------- 7. late checks come early

def _csv_project(proj: Path, split_of) -> None:
    import pandas as pd

    rows = [(f"imgs/{c}/{i:03d}.png", c, split_of(k)) for k, (c, i) in enumerate((c, i) for c in "abc" for i in range(10))]
    pd.DataFrame(rows, columns=["path", "label", "split"]).to_csv(proj / "data/labels.csv", index=False)
    (proj / "params.yaml").write_text(TINY_PARAMS.replace("source: imagefolder", "source: csv")
                                      .replace("root: data/imgs", "root: data/labels.csv"))


def test_a_csv_whose_rows_are_all_test_is_refused_at_prepare(proj):
    _csv_project(proj, lambda k: "test")
    refused(proj, ["prepare"], starts="csv source data/labels.csv: the train split holds no image: the source's own "
                                      "splits (a CSV `split` column, or train/val/test folders) put the rest in val/test")


def test_a_csv_whose_train_rows_are_one_class_is_refused_at_prepare(proj):
    _csv_project(proj, lambda k: "train" if k < 10 else "test")
    refused(proj, ["prepare"], starts="csv source data/labels.csv: the train split holds images of class 'a' only")


def test_one_class_in_data_classes_is_refused_with_the_fix(proj):
    (proj / "params.yaml").write_text(TINY_PARAMS.replace("  root: data/imgs\n", "  root: data/imgs\n  classes: [a]\n"))
    refused(proj, ["prepare"], "params.yaml: data.classes lists 1 class (['a']); a classifier needs at least 2: list "
                               "every class to keep, or null for every class of the source")


def test_decisions_saved_by_excel_with_a_bom_are_read(proj):
    import pandas as pd

    from .helpers import ok

    m = _manifest(proj)
    row = m[m["split"] == "train"].iloc[0]
    (proj / "data/decisions.csv").write_bytes(
        f"\ufeffid,path,action,label,note\r\n{row['id']},{row['path']},drop,,\r\n".encode("utf-8"))
    ok(invoke(proj, "prune"))
    assert row["path"] not in set(pd.read_csv(proj / "data/pruned.csv")["path"])


def test_a_json_file_nested_too_deeply_is_refused_in_one_line(proj):
    (proj / "data/classes.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(proj, ["prune"], starts="data/classes.json: not valid JSON (nested too deeply)")
