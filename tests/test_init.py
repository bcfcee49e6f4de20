"""`clean init` (pipeline/project.py): the clean pipeline in a user's own git repository, the
source data tracked by DVC. Refusals are checked on bare repositories (fast); the slow test
runs the real thing: `clean init` + `dvc repro`, push to a local remote, clone elsewhere + pull,
then an image added / deleted re-runs prepare and what follows; the same for a CSV source."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.errors import CleanError
from pipeline.project import DVC_TEMPLATE, PARAMS_TEMPLATE, TEMPLATES, init, user_pipeline
from tests.helpers import make_imagefolder

ROOT = Path(__file__).resolve().parents[1]


def sh(*args, cwd, check=True, **extra):
    env = {**os.environ, **extra, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1"}
    r = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def dvc(*args, cwd, check=True):
    return sh(sys.executable, "-m", "dvc", *args, cwd=cwd, check=check)


def git_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    sh("git", "init", "-q", cwd=path)
    return path


def snapshot(repo: Path) -> dict:
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*"))
            if p.is_file() and ".git/" not in str(p.relative_to(repo)) + "/"}


def test_templates_are_this_repositorys_pipeline_without_code_deps():
    """pipeline/templates/ is generated from dvc.yaml, params.yaml, .dvc/plots/ (`python -m pipeline.project`)."""
    stale = "pipeline/templates/ is stale: run `python -m pipeline.project`"
    dev = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert yaml.safe_load(DVC_TEMPLATE.read_text()) == user_pipeline(dev), stale
    assert PARAMS_TEMPLATE.read_text() == (ROOT / "params.yaml").read_text(), stale
    for f in (TEMPLATES / "plots").iterdir():
        assert f.read_text() == (ROOT / ".dvc" / "plots" / f.name).read_text(), stale
    user = yaml.safe_load(DVC_TEMPLATE.read_text())
    deps = [d for st in user["stages"].values() for d in st.get("deps", [])]
    assert deps and not [d for d in deps if d.startswith(("pipeline", "cli"))]
    assert list(user["stages"]) == list(dev["stages"])
    assert all(st["cmd"].startswith("clean ") for st in user["stages"].values())
    # DVC takes any dvc.yaml in the repository for a pipeline: the template must not be one
    assert not [p for d in ("pipeline", "cli", "tests", "docs", "bench") for p in (ROOT / d).rglob("dvc.yaml")]


def test_init_writes_the_pipeline_with_the_data_as_a_dependency(tmp_path):
    repo = git_repo(tmp_path / "repo")
    make_imagefolder(repo / "data" / "raw", n_per_class=2)
    p = init(repo, "imagefolder", None)
    assert (p.root, p.track, p.dvc_init) == ("data/raw", "data/raw", True)
    pipe = yaml.safe_load((repo / "dvc.yaml").read_text())
    assert pipe["stages"]["prepare"]["deps"] == ["${data.root}"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["data"]["source"] == "imagefolder" and params["data"]["root"] == "data/raw"
    assert (repo / "data" / "raw.dvc").is_file() and (repo / ".dvc" / "plots" / "heatmap.json").is_file()
    from pipeline.decisions import HEADER

    assert (repo / "data" / "decisions.csv").read_text() == ",".join(HEADER) + "\n"  # prune's dep: header only
    assert "/raw" in (repo / "data" / ".gitignore").read_text()  # git leaves the images to DVC


def test_init_refuses_existing_files_and_changes_nothing(tmp_path):
    repo = git_repo(tmp_path / "repo")
    make_imagefolder(repo / "data" / "raw", n_per_class=2)
    (repo / "dvc.yaml").write_text("stages: {}\n")
    (repo / "params.yaml").write_text("mine: 1\n")
    before = snapshot(repo)
    r = sh(sys.executable, "-m", "cli.main", "init", "--root", "data/raw", cwd=repo, check=False)
    assert r.returncode != 0
    msg = " ".join((r.stdout + r.stderr).split())
    assert "dvc.yaml and params.yaml already exist" in msg and "changed nothing" in msg and "--force" in msg
    assert snapshot(repo) == before and not (repo / ".dvc").exists()
    init(repo, "imagefolder", "data/raw", force=True)  # told to: overwritten
    assert "${data.root}" in (repo / "dvc.yaml").read_text()


@pytest.mark.parametrize("case", ["outside", "not-git", "git-tracked", "output", "csv-outside", "missing"])
def test_init_refusals_name_the_fix(tmp_path, case):
    repo = tmp_path / "repo"
    if case == "not-git":
        repo.mkdir()
    else:
        git_repo(repo)
    root, source, want = "data/raw", "imagefolder", []
    if case == "outside":
        make_imagefolder(tmp_path / "photos", n_per_class=1)
        root, want = str(tmp_path / "photos"), ["outside this repository", "cp -r", "dvc import"]
    elif case == "not-git":
        make_imagefolder(repo / "data" / "raw", n_per_class=1)
        want = ["not inside a git repository", "git init"]
    elif case == "git-tracked":
        make_imagefolder(repo / "data" / "raw", n_per_class=1)
        sh("git", "add", "-A", cwd=repo)
        want = ["tracked by git", "git rm -r --cached data/raw"]
    elif case == "output":
        make_imagefolder(repo / "data" / "images", n_per_class=1)
        root, want = "data/images", ["overlaps the pipeline's output data/images", "data/raw"]
    elif case == "csv-outside":
        make_imagefolder(tmp_path / "photos", n_per_class=1)
        (repo / "labels.csv").write_text("path,label\n../photos/a/000.png,a\n")
        root, source, want = "labels.csv", "csv", ["outside this repository", str(tmp_path / "photos" / "a")]
    else:
        want = ["--root data/raw: no such folder", "data/raw"]
    before = snapshot(repo)
    with pytest.raises(CleanError) as e:
        init(repo, source, root)
    for w in want:
        assert w in str(e.value), (w, str(e.value))
    assert snapshot(repo) == before and not (repo / ".dvc").exists()


# ------------------------------------------------------------------ end to end (real DVC, no mocks)

FAST = {"train": {"epochs": 1, "seeds": [0], "device": "cpu", "workers": 0, "checkpoint_every": 1,
                  "batch_size": 32},
        "score": {"params": "last", "self_influence": False, "val_influence": False},
        "data": {"val_frac": 0.2, "test_frac": 0.2}}


def trim(repo: Path) -> None:
    """params.yaml for seconds per stage: 1 epoch, 1 seed, head-only scores."""
    p = yaml.safe_load((repo / "params.yaml").read_text())
    for sec, kv in FAST.items():
        p[sec].update(kv)
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def ran(out: str) -> list[str]:
    return [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")]


def status(repo: Path, *targets: str) -> dict:
    return json.loads(dvc("status", "--json", *targets, cwd=repo).stdout or "{}")


def manifest_resolves(repo: Path) -> int:
    import pandas as pd

    df = pd.read_csv(repo / "data" / "manifest.csv", dtype={"path": str})
    assert not any(os.path.isabs(p) for p in df["path"])
    assert all((repo / "data" / p).resolve().is_file() for p in df["path"]), "a manifest path does not resolve"
    assert all(str((repo / "data" / p).resolve()).startswith(str(repo.resolve())) for p in df["path"])
    return len(df)


def start(tmp_path: Path, source: str, root: str) -> Path:
    """A fresh git repo: clean init, trimmed params, committed, a local directory remote."""
    repo = tmp_path / "repo"
    r = sh(sys.executable, "-m", "cli.main", "init", "--source", source, "--root", root, cwd=repo)
    assert "wrote dvc.yaml and params.yaml" in r.stdout
    trim(repo)
    dvc("remote", "add", "-d", "store", tmp_path / "remote", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "clean init", cwd=repo)
    return repo


def clone_and_pull(repo: Path, where: Path, full: bool = True) -> None:
    """Push, clone at another path, pull: nothing to re-run, every manifest path resolves there."""
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "results", cwd=repo)
    dvc("push", "-q", cwd=repo)
    sh("git", "clone", "-q", repo, where, cwd=repo.parent)
    dvc("pull", "-q", *([] if full else ["--with-deps", "prepare"]), cwd=where)
    assert manifest_resolves(where) == manifest_resolves(repo)
    if full:
        assert status(where) == {}
        again = dvc("repro", cwd=where).stdout
        assert ran(again) == [] and "Data and pipelines are up to date" in again
        diff = json.loads(dvc("metrics", "diff", "--json", cwd=where).stdout or "{}")
        assert diff == {}, diff  # the same accuracy as the first repo's committed metrics
    else:
        assert status(where, "prepare") == {}


def versions_side_by_side(repo: Path) -> None:
    """Two experiments with different prune strategies, compared by `clean versions` in 120 columns."""
    from pipeline.versions import exp_show, version_rows

    for strategy in ("random", "gradient-cdf"):
        out = dvc("exp", "run", "retrain", "-S", f"prune.strategy={strategy}", "-S", "prune.keep=0.5", cwd=repo).stdout
        assert ran(out) == ["prune", "retrain"], out
    text = sh(sys.executable, "-m", "cli.main", "versions", cwd=repo, COLUMNS="120").stdout
    assert max(len(line) for line in text.splitlines()) <= 120, text
    rows = {r["version"]: r for r in version_rows(exp_show(repo))}
    n = json.loads((repo / "metrics/base.json").read_text())["n_train"]
    exps = [r for name, r in rows.items() if name != "workspace" and "@" not in name and len(name) > 7]
    assert sorted(r["strategy"] for r in exps) == ["gradient-cdf 0.5", "random 0.5"], rows
    head = next(r for name, r in rows.items() if "@" in name)
    assert head["strategy"] == "drop-flagged-gated" and head["kept"] is not None
    for r in exps:
        assert (r["kept"], r["of"]) == (round(0.5 * n), n) and r["accuracy"] is not None and r["verdict"]
        line = next(line for line in text.splitlines() if line.strip().startswith(r["version"]))
        for cell in (r["strategy"], f"{r['kept']}/{n}", f"{r['accuracy']:.4f} ± {r['sd']:.4f}", r["verdict"]):
            assert cell in line, (cell, line)
    sh("git", "checkout", "--", ".", cwd=repo)  # back to the committed version
    dvc("checkout", "-q", cwd=repo)
    assert status(repo) == {}


@pytest.mark.slow
def test_init_repro_push_clone_pull_then_images_change(tmp_path):
    repo = git_repo(tmp_path / "repo")
    make_imagefolder(repo / "data" / "raw", n_per_class=10)
    repo = start(tmp_path, "imagefolder", "data/raw")
    out = dvc("repro", cwd=repo).stdout
    stages = ran(out)
    assert stages[0] == "prepare" and {"train", "score", "flag", "prune", "retrain", "report"} <= set(stages)
    assert json.loads((repo / "metrics" / "pruned.json").read_text())["n_train"] > 0
    clone_and_pull(repo, tmp_path / "elsewhere" / "clone")
    versions_side_by_side(repo)

    # one image added, then one deleted: `dvc status` names prepare; after prepare re-runs, DVC names
    # every stage that follows it (what the next `dvc repro` re-runs; one full repro above is enough)
    for change, n in (("add", 31), ("delete", 30)):
        if change == "add":
            shutil.copy(repo / "data/raw/a/000.png", repo / "data/raw/a/new.png")
        else:
            (repo / "data/raw/b/003.png").unlink()
        st = status(repo, "prepare") if change == "delete" else status(repo)  # (after "add", the rest is pending)
        assert "prepare" in st and set(st) <= {"prepare", "data/raw.dvc"}, (change, st)
        assert ran(dvc("repro", "prepare", cwd=repo).stdout) == ["prepare"]
        follows = status(repo)
        assert {"train", "evaluate", "score", "flag", "prune", "retrain", "report"} <= set(follows), follows
        assert "prepare" not in follows and "data/raw.dvc" not in follows  # `dvc repro` committed the images
        assert manifest_resolves(repo) == n
    text = (repo / "data/manifest.csv").read_text()
    assert "raw/a/new.png" in text and "raw/b/003.png" not in text


@pytest.mark.slow
def test_init_csv_source_paths_relative_to_the_csv(tmp_path):
    repo = git_repo(tmp_path / "repo")
    make_imagefolder(repo / "shots", n_per_class=4)
    (repo / "labels").mkdir()
    rows = [f"../shots/{c}/{i:03d}.png,{c}" for c in "abc" for i in range(4)]
    (repo / "labels" / "train.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    repo = start(tmp_path, "csv", "labels/train.csv")
    pipe = yaml.safe_load((repo / "dvc.yaml").read_text())
    assert pipe["stages"]["prepare"]["deps"] == ["${data.root}", "shots"] and (repo / "shots.dvc").is_file()
    assert ran(dvc("repro", "prepare", cwd=repo).stdout) == ["prepare"]
    assert "../shots/a/000.png" in (repo / "data/manifest.csv").read_text()
    clone_and_pull(repo, tmp_path / "elsewhere" / "clone", full=False)

    shutil.copy(repo / "shots/c/000.png", repo / "shots/c/extra.png")  # a new image, listed in the CSV
    with open(repo / "labels" / "train.csv", "a") as f:
        f.write("../shots/c/extra.png,c\n")
    st = status(repo, "prepare")
    assert "prepare" in st and set(st) <= {"prepare", "shots.dvc"}, st
    assert ran(dvc("repro", "prepare", cwd=repo).stdout) == ["prepare"]
    assert manifest_resolves(repo) == 13 and "train" in status(repo) and status(repo, "prepare") == {}
    (repo / "shots/a/001.png").unlink()  # a listed image deleted: prepare re-runs, the row becomes a problem
    assert "prepare" in status(repo, "prepare")
    assert ran(dvc("repro", "prepare", cwd=repo).stdout) == ["prepare"]
    assert manifest_resolves(repo) == 12
    assert "file not found" in (repo / "data/problems.csv").read_text()


@pytest.mark.slow
def test_demo_plants_look_alike_noise_and_reports_against_the_truth(tmp_path):
    """`clean demo` in a digits project: the printed precision, recall, removals and accuracy change
    are the planted truth (manifest) against flags.csv / pruned.csv, recomputed here."""
    import pandas as pd

    repo = git_repo(tmp_path / "repo")
    sh(sys.executable, "-m", "cli.main", "init", "--source", "digits", cwd=repo)
    trim(repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "clean init", cwd=repo)
    out = sh(sys.executable, "-m", "cli.main", "demo", "--set", "train.epochs=4", cwd=repo, COLUMNS="120").stdout
    man = pd.read_csv(repo / "data/manifest.csv")
    train = man[man["split"] == "train"]
    planted = set(train["id"][train["noisy"] == 1])
    assert len(planted) == round(0.15 * len(train))
    pairs = train[train["noisy"] == 1]
    assert ((pairs["orig_label"] + 1) % 10 == pairs["label"]).all()  # look-alike pairs: c → c+1
    flags = pd.read_csv(repo / "scores/flags.csv")
    flagged = set(flags["id"][(flags["flagged"] == 1) & flags["id"].isin(train["id"])])
    found = len(flagged & planted)
    assert found > 0
    kept = set(pd.read_csv(repo / "data/pruned.csv")["id"])
    removed_planted = len(planted - kept)
    base = json.loads((repo / "metrics/base.json").read_text())
    pruned = json.loads((repo / "metrics/pruned.json").read_text())
    lines = {line.split()[0]: " ".join(line.split()) for line in out.splitlines() if line.strip()}
    assert lines["planted"].startswith(f"planted {len(planted)} wrong labels")
    assert (f"found {found} of them among {len(flagged)} flagged: precision {found / len(flagged):.1%}, "
            f"recall {found / len(planted):.1%}") == lines["found"]
    assert f"removed {removed_planted} planted ({len(planted) - removed_planted} left)" in lines["fixed"]
    assert lines["accuracy"].startswith(f"accuracy {base['accuracy']:.4f} → {pruned['accuracy']:.4f} "
                                        f"(change {pruned['accuracy'] - base['accuracy']:+.4f}")
    assert "demo" not in sh("git", "status", "--short", cwd=repo).stdout  # an experiment, not a commit
    again = sh(sys.executable, "-m", "cli.main", "demo", "--no-run", cwd=repo, COLUMNS="120").stdout
    assert [line for line in again.splitlines() if line.startswith("found")] == \
        [line for line in out.splitlines() if line.startswith("found")]
