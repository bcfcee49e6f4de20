"""Bad input never crashes a command: each one fails up front with one line that says what is
wrong, where, and how to fix it (exit code 2, no traceback). An unexpected exception is one line
too (exit 1) unless CLEAN_DEBUG=1. Corrupt images are reported, never a crash mid-epoch; outputs
never overwrite inputs; source images are never modified; no pickle, no unsafe YAML, no shell."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner


from .helpers import TINY_PARAMS, invoke, make_imagefolder, ok, project_fixtures

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

PARAMS = TINY_PARAMS

# every command that reads params.yaml, with arguments that are valid in the project below
PARAM_COMMANDS = {
    "prepare": ["prepare"],
    "train": ["train"],
    "evaluate": ["evaluate"],
    "score": ["score"],
    "flag": ["flag"],
    "prune": ["prune"],
    "retrain": ["retrain"],
    "sweep point": ["sweep", "point", "--strategy", "random", "--keep", "0.5", "--out", "sweep/p"],
    "sweep collect": ["sweep", "collect"],
}
# every command that reads the manifest and its images / ids
MANIFEST_COMMANDS = {
    "train": ["train"],
    "evaluate": ["evaluate"],
    "score": ["score"],
    "flag": ["flag", "--method", "isolation-forest"],
    "prune": ["prune", "--strategy", "random"],
    "retrain": ["retrain", "--manifest", "data/manifest.csv"],
    "sweep point": ["sweep", "point", "--strategy", "random", "--keep", "0.5", "--out", "sweep/p"],
}
MODEL_COMMANDS = {k: MANIFEST_COMMANDS[k] for k in ("evaluate", "score", "flag")}


def clean(where: Path, *args):
    return invoke(where, *args)


def fails(res, message: str, code: int = 2) -> None:
    """The command printed `error: <message>` as its last line, exited with `code`, no traceback."""
    out = " ".join(res.output.split())
    assert res.exit_code == code, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    assert out.count("error:") == 1, res.output
    assert out[out.rindex("error:"):] == f"error: {message}", res.output


# prepare → train (1 epoch) → score → flag on 3 classes x 10 tiny images inside data/; a copy per test
_debug, base, proj = project_fixtures("reliability", PARAMS)


def edit_csv(path: Path, fn) -> None:
    df = pd.read_csv(path, keep_default_na=False, dtype=str)
    fn(df).to_csv(path, index=False)


def edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def a_train_id(p: Path) -> str:
    m = pd.read_csv(p / "data/manifest.csv")
    return str(int(m[m["split"] == "train"]["id"].iloc[0]))


# --------------------------------------------------------------------------- params.yaml

BAD_PARAMS = {
    "unknown key": ("train:\n  epoch: 3\n", "unknown key 'train.epoch'; did you mean 'train.epochs'?"),
    "unknown section": ("trian:\n  epochs: 3\n", "unknown section 'trian'; did you mean 'train'?"),
    "out of range": ("prune:\n  keep: 1.5\n", "prune.keep must be > 0.0 and ≤ 1.0, got 1.5"),
    "not allowed": ("score:\n  norm: l3\n", "score.norm = 'l3' is not allowed; use one of: l1, l2, linf"),
    "wrong type": ("train:\n  epochs: many\n", "train.epochs must be an integer, got 'many'"),
    "nan": ("train:\n  lr: .nan\n", "train.lr must be a finite number, got nan"),
    "seeds": ("train:\n  seeds: 3\n", "train.seeds must be a non-empty list of distinct integers ≥ 0, got 3"),
    "not a mapping": ("- a\n- b\n", "expected a mapping of sections (data, model, train, ...), got list"),
    "section not a mapping": ("train: 3\n", "section 'train' must be a mapping of keys, got 3"),
    "bad yaml": ("train: [\n", "not valid YAML (ParserError: while parsing a flow node); fix the syntax"),
    "unsafe yaml": ("train: !!python/object/apply:os.system [echo hi]\n",
                    "not valid YAML (ConstructorError: could not determine a constructor for the tag "
                    "'tag:yaml.org,2002:python/object/apply:os.system'); fix the syntax"),
    "binary": (b"\xff\xfe\x00bad", "not a UTF-8 text file (invalid start byte at byte 0); "
                                   "params.yaml must be YAML text"),
    "image_size markup": ("data:\n  image_size: [8]\n",
                          "data.image_size must be null, a positive integer or [H, W], got [8]"),
}


@pytest.mark.parametrize("case", list(BAD_PARAMS))
@pytest.mark.parametrize("command", list(PARAM_COMMANDS))
def test_bad_params_fail_every_command_up_front(base, tmp_path, command, case):
    text, message = BAD_PARAMS[case]
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(text if isinstance(text, bytes) else text.encode())
    before = sorted(p for p in base.rglob("*"))
    fails(clean(base, *PARAM_COMMANDS[command], "--params", bad), f"{bad}: {message}")
    assert sorted(p for p in base.rglob("*")) == before  # nothing written, nothing started


def test_params_path_is_a_folder(proj):
    fails(clean(proj, "train", "--params", "data"), "data is a folder; --params needs a params.yaml file")


def test_bad_option_value_names_the_allowed_values(proj):
    from pipeline.registry import STRATEGIES

    fails(clean(proj, "prune", "--strategy", "best"), "command-line options: prune.strategy = 'best' is not allowed; "
          f"use one of: {', '.join(STRATEGIES)}")
    assert STRATEGIES.names()[:5] == ["random", "max-gradient", "non-extreme", "gradient-cdf", "drop-flagged"]
    fails(clean(proj, "prepare", "--val-frac", "1.5"), "command-line options: data.val_frac must be ≥ 0.0 and < 1.0, got 1.5")
    fails(clean(proj, "evaluate", "--split", "bogus"), "--split 'bogus' is not a split; use one of train, val, test")


# --------------------------------------------------------------------------- manifest + classes.json

def _drop_split(df):
    return df.drop(columns=["split"])


def _dup_id(df):
    df.loc[df.index[1], "id"] = df["id"].iloc[0]
    return df


def _label_outside(df):
    df.loc[df.index[3], "label"] = "7"
    return df


def _bad_split(df):
    df.loc[df.index[3], "split"] = "training"
    return df


def _float_id(df):
    df.loc[df.index[3], "id"] = "2.5"
    return df


def _empty_path(df):
    df.loc[df.index[3], "path"] = ""
    return df


BAD_MANIFESTS = {
    "missing column": (_drop_split, "data/manifest.csv: missing column(s) split; a manifest needs id,path,label,split "
                                    "(found: id,path,label)"),
    "duplicate id": (_dup_id, "data/manifest.csv: duplicate id 0 (1 duplicates); ids must be unique"),
    "label outside classes": (_label_outside, "data/manifest.csv: label 7 (id 3) is outside the 3 classes of "
                                              "classes.json (0..2)"),
    "unknown split": (_bad_split, "data/manifest.csv: unknown split 'training'; use one of train, val, test"),
    "non-integer id": (_float_id, "data/manifest.csv: column 'id' must hold integers; row 5 has 2.5"),
    "empty path": (_empty_path, "data/manifest.csv: row 5 (id 3) has an empty path; every row needs the image file "
                                "it describes (re-run `clean prepare`)"),
    "no rows": (lambda df: df.iloc[:0], "data/manifest.csv: the manifest has no rows; run `clean prepare` on a "
                                        "source with images"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
@pytest.mark.parametrize("command", list(MANIFEST_COMMANDS))
def test_bad_manifest_fails_every_command(proj, command, case):
    fn, message = BAD_MANIFESTS[case]
    edit_csv(proj / "data/manifest.csv", fn)
    fails(clean(proj, *MANIFEST_COMMANDS[command]), message)


@pytest.mark.parametrize("command", ["train", "score", "flag", "retrain", "sweep point"])
def test_missing_image_file_is_named(proj, command):
    tid = a_train_id(proj)
    edit_csv(proj / "data/manifest.csv", lambda df: df.assign(path=df["path"].where(df["id"] != tid, "imgs/a/nope.png")))
    if command == "flag":  # flag refuses scores whose images are not the manifest's: score the same list
        edit_csv(proj / "scores/scores.csv", lambda df: df.assign(path=df["path"].where(df["id"] != tid, "imgs/a/nope.png")))
    shown = "../../data/imgs/a/nope.png" if command == "sweep point" else "imgs/a/nope.png"  # sweep/p/pruned.csv
    fails(clean(proj, *MANIFEST_COMMANDS[command]),
          f"cannot read image {shown}: file not found; run `clean prepare`, which lists unreadable files in "
          "data/problems.csv, and fix or remove them")


def test_empty_splits(proj):
    edit_csv(proj / "data/manifest.csv", lambda df: df.assign(split=df["split"].replace("test", "val")))
    fails(clean(proj, "evaluate"), "data/manifest.csv: the 'test' split is empty; check data.val_frac/test_frac or the manifest")
    edit_csv(proj / "data/manifest.csv", lambda df: df.assign(split=df["split"].replace("train", "val")))
    fails(clean(proj, "train"), "data/manifest.csv: the 'train' split is empty; check data.val_frac/test_frac or the manifest")
    fails(clean(proj, "score"), "data/manifest.csv: no 'train' rows to score")


BAD_CLASSES = {
    "empty": ('{"classes": []}', "data/classes.json: the class list is empty; a classifier needs at least one class "
                                 "(re-run `clean prepare` on a source with images)"),
    "duplicate": ('{"classes": ["a", "a", "c"]}', "data/classes.json: class 'a' is listed more than once; class "
                                                  "names must be distinct"),
    "not names": ('{"classes": [1, null, {}]}', "data/classes.json: class names must be non-empty strings, got 1; "
                                                "re-run `clean prepare`"),
    "wrong shape": ('{"names": ["a"]}', 'data/classes.json: expected {"classes": [names...]}; re-run `clean prepare`'),
    "bad json": ('{"classes": [', "data/classes.json: not valid JSON (Expecting value: line 1 column 14 (char 13)); "
                                  "re-run `clean prepare`"),
}


@pytest.mark.parametrize("case", list(BAD_CLASSES))
@pytest.mark.parametrize("command", ["train", "score", "prune", "retrain"])
def test_bad_classes_json(proj, command, case):
    text, message = BAD_CLASSES[case]
    (proj / "data/classes.json").write_text(text)
    fails(clean(proj, *MANIFEST_COMMANDS[command]), message)


def test_classes_json_missing(proj):
    (proj / "data/classes.json").unlink()
    fails(clean(proj, "train"), "data/classes.json not found; it is written by `clean prepare` next to the manifest")


# --------------------------------------------------------------------------- model vs data

@pytest.mark.parametrize("command", list(MODEL_COMMANDS))
def test_model_class_count_does_not_match_the_data(proj, command):
    edit_json(proj / "data/classes.json", classes=["a", "b", "c", "d"])
    fails(clean(proj, *MODEL_COMMANDS[command]), "models/base was trained on 3 classes (a, b, c) but data/classes.json "
          "has 4 (a, b, c, d); use a model trained on this data (clean train --manifest data/manifest.csv)")


@pytest.mark.parametrize("command", list(MODEL_COMMANDS))
def test_model_input_channels_do_not_match_the_data(proj, command):
    edit_json(proj / "data/classes.json", in_chans=3)
    fails(clean(proj, *MODEL_COMMANDS[command]), "models/base expects 1-channel (grayscale) images but "
          "data/classes.json says the data has 3-channel (color) images; use a model trained on this data "
          "(clean train --manifest data/manifest.csv)")


def test_color_folder_scored_with_a_grayscale_model(proj):
    for p in (proj / "data/imgs").rglob("*.png"):
        img = Image.open(p).convert("RGB")
        (proj / "rgb" / p.relative_to(proj / "data/imgs")).parent.mkdir(parents=True, exist_ok=True)
        img.save(proj / "rgb" / p.relative_to(proj / "data/imgs"))
    fails(clean(proj, "score", "rgb", "--out", "s2"), "models/base expects 1-channel (grayscale) images but "
          "s2/input/classes.json says the data has 3-channel (color) images; use a model trained on this data "
          "(clean train --manifest s2/input/manifest.csv)")


def test_broken_model_folder(proj):
    cfg = proj / "models/base/config.json"
    good = cfg.read_text()
    d = json.loads(good)
    d.pop("num_classes")
    cfg.write_text(json.dumps(d))
    fails(clean(proj, "score"), "models/base/config.json: 'num_classes' missing; retrain it: clean train --out models/base")
    cfg.write_text("{")
    fails(clean(proj, "evaluate"), "models/base/config.json: not valid JSON (Expecting property name enclosed in "
          "double quotes: line 1 column 2 (char 1)); retrain it: clean train --out models/base")
    cfg.write_text(good)
    (proj / "models/base/model.safetensors").write_bytes(b"garbage")
    fails(clean(proj, "score"), "models/base/model.safetensors: not a readable safetensors file (Error while "
          "deserializing header: header too small); retrain with `clean train`")
    fails(clean(proj, "evaluate", "--model", "models/nope"),
          "models/nope/config.json not found; train a model first: clean train --out models/nope")


@pytest.mark.parametrize("command", list(MODEL_COMMANDS))
def test_nan_weights_are_rejected_before_scoring(proj, command):
    import torch
    from safetensors.torch import load_file, save_file

    f = proj / "models/base/model.safetensors"
    st = load_file(f)
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in st.items()}, f)
    res = clean(proj, *MODEL_COMMANDS[command])
    n = sum(v.is_floating_point() for v in st.values())
    first = sorted(k for k, v in st.items() if v.is_floating_point())[0]
    fails(res, f"models/base/model.safetensors: the weights hold NaN/inf values ({first} and {n - 1} more); "
               "training diverged: retrain with a lower train.lr")


def test_diverging_training_stops_with_a_clear_message(proj):
    res = clean(proj, "train", "--lr", "1e30", "--optimizer", "sgd", "--out", "models/x")
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert re.search(r"error: training diverged: the loss became nan at epoch 1, samples \d+-\d+; "
                     r"lower train\.lr \(now 1e\+30\) or check the images$", out), out
    assert not (proj / "models/x/model.safetensors").exists()


# --------------------------------------------------------------------------- scores and flags

def test_scores_from_another_manifest(proj):
    edit_csv(proj / "scores/scores.csv", lambda df: df.assign(id=(df["id"].astype(int) + 1000).astype(str)))
    first = int(pd.read_csv(proj / "scores/scores.csv")["id"].min())
    n = len(pd.read_csv(proj / "scores/scores.csv"))
    msg = (f"scores/scores.csv does not match data/manifest.csv (id {first} is not a training id of the manifest; "
           f"{n} extra, {n} missing); the scores come from another manifest: rerun `clean score` on this one")
    fails(clean(proj, "prune", "--strategy", "random"), msg)
    fails(clean(proj, *MANIFEST_COMMANDS["sweep point"]), msg)
    fails(clean(proj, "flag", "--method", "isolation-forest"), f"scores hold id {first} which is not in "
          "data/manifest.csv; the scores come from another manifest: rerun `clean score`")


def test_scores_with_other_labels(proj):
    edit_csv(proj / "scores/scores.csv", lambda df: df.assign(label=((df["label"].astype(int) + 1) % 3).astype(str)))
    sc = pd.read_csv(proj / "scores/scores.csv")
    m = pd.read_csv(proj / "data/manifest.csv").set_index("id")
    i = int(m[m["split"] == "train"].index[0])
    fails(clean(proj, "prune", "--strategy", "random"),
          f"scores/scores.csv does not match data/manifest.csv: id {i} has label {int(sc.set_index('id').loc[i, 'label'])} "
          f"in the scores but {int(m.loc[i, 'label'])} in the manifest ({len(sc)} differ); the manifest changed since "
          "scoring: rerun `clean score`")


def test_non_finite_and_malformed_scores(proj):
    sc = proj / "scores/scores.csv"
    good = sc.read_text()
    first = pd.read_csv(sc)["id"].iloc[0]
    edit_csv(sc, lambda df: df.assign(loss=["nan", "inf"] + list(df["loss"][2:])))
    fails(clean(proj, "flag", "--score", "loss"), f"scores/scores.csv: column 'loss' has 2 NaN/inf value(s) (first: id {first}); "
          "re-run `clean score` or choose another flag.score")
    edit_csv(sc, lambda df: df.assign(grad_norm=["inf"] + list(df["grad_norm"][1:])))
    fails(clean(proj, "prune", "--strategy", "max-gradient"), f"scores/scores.csv: column 'grad_norm' has 1 "
          f"missing/NaN/inf value(s) (first: id {first}); choose another prune.by or rescore")
    fails(clean(proj, "prune", "--strategy", "max-gradient", "--by", "self_influence"),
          "scores/scores.csv: column 'self_influence' is empty (not computed); choose another prune.by or rescore "
          "with it (e.g. score.self_influence: true)")
    sc.write_text(good)
    edit_csv(sc, lambda df: df.assign(loss="abc"))
    fails(clean(proj, "flag", "--score", "loss"), "scores/scores.csv: column 'loss' must hold numbers; row 2 has 'abc'; "
          "regenerate it with `clean score`")
    sc.write_text("")
    fails(clean(proj, "flag"), "scores/scores.csv: not a readable CSV (EmptyDataError: No columns to parse from "
          "file); run `clean score` first")
    sc.write_text("id,label,loss\n")
    fails(clean(proj, "prune"), "scores/scores.csv: no rows; regenerate it with `clean score`")


def test_malformed_flags(proj):
    fl = proj / "scores/flags.csv"
    good = fl.read_text()
    edit_csv(fl, lambda df: df.assign(flagged="7"))
    fails(clean(proj, "prune"), "scores/flags.csv: column 'flagged' must be 0 or 1; row 2 has 7; re-run `clean flag`")
    fl.write_text(good)
    edit_csv(fl, lambda df: df.assign(id=(df["id"].astype(int) + 1000).astype(str)))
    train = pd.read_csv(fl)
    train = train[train["split"] == "train"] if "split" in train.columns else train  # val/test rows: their own
    first, n = int(train["id"].min()), len(train)
    fails(clean(proj, "prune"), f"scores/flags.csv does not match the training ids (id {first} is not a training id; "
          f"{n} extra, {n} missing); the flags come from other scores: re-run `clean flag`")
    fl.unlink()
    fails(clean(proj, "prune"), "prune.strategy = drop-flagged-gated needs flags (scores/flags.csv); run `clean flag` first")


def test_compare_score_files_of_different_samples(proj):
    edit_csv(proj / "scores/scores.csv", lambda df: df.assign(id=(df["id"].astype(int) + 1000).astype(str)))
    shutil.copy(proj / "scores/scores.csv", proj / "scores/b.csv")
    edit_csv(proj / "scores/b.csv", lambda df: df.assign(id=(df["id"].astype(int) - 1000).astype(str)))
    res = clean(proj, "compare", "scores/scores.csv", "scores/b.csv")
    assert res.exit_code == 2 and "the two score files cover different samples" in " ".join(res.output.split())


# --------------------------------------------------------------------------- corrupt / truncated images

def _break_images(folder: Path) -> dict[str, str]:
    """Corrupt a few files of an image folder → {relative path: reason expected in problems.csv}."""
    (folder / "a/000.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    big = np.random.default_rng(0).integers(0, 255, (64, 64)).astype(np.uint8)
    Image.fromarray(big).save(folder / "a/001.png")
    raw = (folder / "a/001.png").read_bytes()
    (folder / "a/001.png").write_bytes(raw[: len(raw) // 2])
    (folder / "b/002.png").write_bytes(b"")
    (folder / "c/x.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50)
    return {"a/000.png": "not an image (unrecognised format)",
            "a/001.png": "truncated image (image file is truncated)",
            "b/002.png": "empty file (0 bytes)",
            "c/x.jpg": "not an image (unrecognised format)"}


def test_prepare_lists_corrupt_and_truncated_images_in_problems_csv(proj):
    shutil.rmtree(proj / "data")
    make_imagefolder(proj / "data/imgs", n_per_class=10)
    expected = _break_images(proj / "data/imgs")
    res = ok(clean(proj, "prepare"))
    assert "4 problem file(s)" in res.output
    problems = pd.read_csv(proj / "data/problems.csv")
    assert dict(zip(problems["path"], problems["reason"])) == {f"imgs/{k}": v for k, v in expected.items()}
    m = pd.read_csv(proj / "data/manifest.csv")
    assert len(m) == 30 - 3 and not set(m["path"]) & set(problems["path"])
    ok(clean(proj, "train"))  # the checked dataset trains


def test_image_broken_after_prepare_is_named_not_a_crash_mid_epoch(proj):
    m = pd.read_csv(proj / "data/manifest.csv")
    path = m[m["split"] == "train"]["path"].iloc[-1]
    raw = (proj / "data" / path).read_bytes()
    (proj / "data" / path).write_bytes(raw[:40])
    for cmd in (["train"], ["score"]):
        fails(clean(proj, *cmd), f"cannot read image {path}: not an image (unrecognised format); run `clean prepare`, "
              "which lists unreadable files in data/problems.csv, and fix or remove them")


def test_score_an_unchecked_folder_with_corrupt_images(proj):
    make_imagefolder(proj / "mine", n_per_class=4, seed=3)
    expected = _break_images(proj / "mine")
    res = ok(clean(proj, "score", "mine", "--out", "s2"))
    assert "4 problem(s) listed in s2/input/problems.csv" in " ".join(res.output.split())
    problems = pd.read_csv(proj / "s2/input/problems.csv")
    assert dict(zip(problems["path"], problems["reason"])) == {str(proj / "mine" / k): v for k, v in expected.items()}
    assert len(pd.read_csv(proj / "s2/scores.csv")) == 12 - 3


# --------------------------------------------------------------------------- outputs never clobber inputs

def test_outputs_never_overwrite_inputs(proj):
    before = (proj / "data/manifest.csv").read_bytes()
    fails(clean(proj, "prune", "--out", "data/manifest.csv"), "--out data/manifest.csv is --manifest "
          "data/manifest.csv, an input of `clean prune`: an output never replaces an input; give --out another path")
    assert (proj / "data/manifest.csv").read_bytes() == before
    fails(clean(proj, "prune", "--out", "data"), "--out data is a folder; give a file path (e.g. data/pruned.csv, "
          "prune/summary.json)")
    fails(clean(proj, "prepare", "--out", "params.yaml"), "--out params.yaml is a file; give a folder for "
          "manifest.csv, classes.json and problems.csv")
    fails(clean(proj, "train", "--out", "params.yaml"), "--out params.yaml is a file; give a folder for the model "
          "(e.g. models/base)")


def test_prepare_needs_two_classes(proj):
    shutil.rmtree(proj / "data/imgs/b")
    shutil.rmtree(proj / "data/imgs/c")
    fails(clean(proj, "prepare"), "imagefolder source data/imgs: only class 'a' has readable images; a classifier "
          "needs at least 2 classes (check data.root; unreadable files are in problems.csv)")


# --------------------------------------------------------------------------- unexpected errors

def test_unexpected_exception_is_one_line_unless_clean_debug(proj, monkeypatch):
    import pipeline.stages.prune

    def boom(*a, **k):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(pipeline.stages.prune, "prune", boom)
    monkeypatch.delenv("CLEAN_DEBUG")
    res = clean(proj, "prune")
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    assert "Traceback" not in res.output
    assert " ".join(res.output.split()) == "internal error: RuntimeError: boom second line (set CLEAN_DEBUG=1 for the traceback)"
    monkeypatch.setenv("CLEAN_DEBUG", "1")
    res = clean(proj, "prune")
    assert isinstance(res.exception, RuntimeError)  # tests and debugging see the real exception


def test_messages_are_printed_literally_not_as_markup(proj):
    (proj / "data/classes.json").write_text('{"names": []}')
    res = clean(proj, "train")
    assert '{"classes": [names...]}' in res.output


# --------------------------------------------------------------------------- safety

def _sources():
    return sorted([*ROOT.glob("pipeline/*.py"), *ROOT.glob("cli/*.py")])


def test_no_pickle_no_unsafe_yaml_no_shell():
    banned = {
        r"\bimport pickle\b|\bpickle\.load": "pickle",
        r"torch\.load\(": "torch.load (pickle); use safetensors",
        r"yaml\.load\(|yaml\.unsafe_load|yaml\.full_load": "unsafe YAML; use yaml.safe_load",
        r"os\.system\(|os\.popen\(|shell=True": "shell-out",
        r"(?<![\w.])(eval|exec)\(": "eval/exec",
    }
    found = []
    for f in _sources():
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if re.search(r"\bsubprocess\b", line) and f.relative_to(ROOT).as_posix() != "pipeline/tools.py":
                found.append(f"{f.relative_to(ROOT)}:{n}: a process started outside pipeline/tools.py: {line.strip()}")
            for pat, why in banned.items():
                if re.search(pat, line):
                    found.append(f"{f.relative_to(ROOT)}:{n}: {why}: {line.strip()}")
            if "np.load(" in line and "allow_pickle=False" not in line:
                found.append(f"{f.relative_to(ROOT)}:{n}: np.load without allow_pickle=False")
    assert not found, "\n".join(found)


def test_every_writer_goes_through_an_atomic_temp_file():
    """File writes outside pipeline/io.py must target the temp path of io.atomic_path (or a memory buffer)."""
    writer = re.compile(r"\.(to_csv|to_json|savefig|write_text|write_bytes)\(|\b(im|img|image|canvas|fig)\w*\.save\(|"
                        r"np\.savez?(_compressed)?\(|torch\.save\(|save_file\(|"
                        r"open\([^)]*['\"][wax]b?\+?['\"]|shutil\.(copy|copyfile|copy2|move)\(")
    found = []
    for f in _sources():
        if f.name == "io.py":
            continue
        lines = f.read_text().splitlines()
        for n, line in enumerate(lines):
            if line.lstrip().startswith("#") or not writer.search(line):
                continue
            context = "\n".join(lines[max(0, n - 3):n + 1])
            if (re.search(r"\(\s*(str\()?tmp\b|\bbuf\b|, tmp\)|\btmp\.write_(bytes|text)\(", line)
                    or ("open(tmp" in context and "(f" in line)):
                continue
            found.append(f"{f.relative_to(ROOT)}:{n + 1}: {line.strip()}")
    assert not found, "writes that bypass pipeline/io.atomic_path:\n" + "\n".join(found)


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_source_images_are_never_modified(tmp_path):
    """Hash + mtime of every source file (an image folder, read through a CSV source) before and after
    prepare → train → score → flag → prune → retrain, and `clean score` of the folder itself."""
    src = make_imagefolder(tmp_path / "photos", n_per_class=8)
    (tmp_path / "photos/a/extra.PNG").write_bytes((src / "a/000.png").read_bytes())
    (tmp_path / "photos/c/broken.png").write_bytes(b"\x89PNG broken")
    rows = ["path,label"] + [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted(src.rglob("*.*"))]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "params.yaml").write_text(PARAMS.replace("source: imagefolder", "source: csv")
                                          .replace("root: data/imgs", "root: list.csv"))
    before = _snapshot(src)
    csv_before = (tmp_path / "list.csv").read_bytes()
    for cmd in (["prepare"], ["train"], ["score"], ["flag"], ["prune", "--strategy", "random", "--keep", "0.5"],
                ["retrain"], ["score", "photos", "--out", "s2"]):
        ok(clean(tmp_path, *cmd))
    assert _snapshot(src) == before
    assert (tmp_path / "list.csv").read_bytes() == csv_before
    assert "broken.png" in (tmp_path / "data/problems.csv").read_text()
