"""End to end as a user runs it: `dvc repro` in a fresh git repo, then a param change and
`dvc metrics diff`. Uses the real embedded digits dataset with few epochs."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["cli", "pipeline", "dvc.yaml", "params.yaml", ".dvc/config", ".dvc/plots", ".dvcignore", ".gitignore",
                 "pyproject.toml", "data/decisions.csv"]

pytestmark = pytest.mark.slow


def sh(*args, cwd, check=True):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1"}
    r = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def copy_project(dst: Path) -> Path:
    for f in PROJECT_FILES:
        src = ROOT / f
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst / f, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst / f)
    return dst


def set_params(repo: Path, **sections):
    p = yaml.safe_load((repo / "params.yaml").read_text())
    for sec, kv in sections.items():
        p[sec].update(kv)
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def test_dvc_repro_then_param_change_and_metrics_diff(tmp_path):
    repo = copy_project(tmp_path / "proj")
    sh("git", "init", "-q", cwd=repo)
    set_params(repo, train={"epochs": 4, "device": "cpu", "seeds": [0, 1]}, score={"params": "last"},
               sweep={"strategies": ["random", "max-gradient"]},
               flag={"method": "quantile", "quantile": 0.1})
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "project", cwd=repo)

    out = sh("dvc", "repro", cwd=repo).stdout
    for stage in ("prepare", "train", "evaluate", "score", "flag", "prune", "retrain", "sweep", "figures", "report"):
        assert f"Running stage '{stage}'" in out, stage
    assert "no sweep point (opt-in)" in out  # the paper's sweep is out of the default path
    base = json.loads((repo / "metrics/base.json").read_text())
    base_details = json.loads((repo / "plots/evaluate_base.json").read_text())
    assert base_details["n"] == 359 and base["accuracy"] > 0.8  # digits test split, 4 epochs
    for f in ("data/manifest.csv", "data/classes.json", "data/problems.csv", "models/base/model.safetensors",
              "plots/confusion_base.csv", "dvc.lock", "scores/scores.csv", "scores/flags.csv",
              "scores/top_flagged.png", "data/pruned.csv", "prune/summary.json", "metrics/pruned.json",
              "plots/sweep.csv", "reports/index.html"):
        assert (repo / f).exists(), f
    # the flags.csv contract: the driving rule, then is_<type>/<type>_score for every issue type
    import pandas as pd

    from pipeline.registry import ISSUES

    flags = pd.read_csv(repo / "scores/flags.csv")
    assert list(flags.columns[:4]) == ["id", "flagged", "rule", "value"]
    for t in ISSUES:
        assert {f"is_{t}", f"{t}_score"} <= set(flags.columns), t
        assert set(flags[f"is_{t}"].unique()) <= {0, 1}
    assert {"suggested_label", "duplicate_group"} <= set(flags.columns)
    issues = json.loads((repo / "scores/issues.json").read_text())
    assert set(issues) == set(ISSUES) and all("n" in d for d in issues.values())
    html = (repo / "reports/index.html").read_text()
    assert "<section id='issues'>" in html
    # DVC's own tables fit a terminal: small, flat metrics files
    text = sh("dvc", "metrics", "show", cwd=repo).stdout
    assert max(len(line) for line in text.splitlines()) <= 120, text
    shown = json.loads(sh("dvc", "metrics", "show", "--json", cwd=repo).stdout)
    files = next(iter(shown.values()))["data"]
    assert {"metrics/base.json", "metrics/pruned.json"} <= set(files)
    pruned = files["metrics/pruned.json"]["data"]
    assert json.loads((repo / "plots/evaluate_pruned.json").read_text())["n"] == base_details["n"]
    assert pruned["n_train"] < base["n_train"]
    # nothing changed → nothing re-runs
    again = sh("dvc", "repro", cwd=repo).stdout
    assert "Data and pipelines are up to date" in again or "didn't change" in again
    assert "Running stage" not in again
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "base run", cwd=repo)

    # editing one scoring module re-runs score and what follows from it, and nothing else
    engine = repo / "pipeline/scores/engine.py"
    original = engine.read_text()
    engine.write_text(original + "\n# an edit\n")
    status = json.loads(sh("dvc", "status", "--json", cwd=repo).stdout)
    assert set(status) == {"score"}, status
    # downstream of score: what DVC re-runs when the scores change (the comment leaves them equal)
    dag = sh("dvc", "dag", "--md", cwd=repo).stdout
    assert "score" in dag
    ran = sh("dvc", "repro", cwd=repo).stdout
    assert "Running stage 'score'" in ran
    for upstream in ("prepare", "train", "evaluate"):
        assert f"Running stage '{upstream}'" not in ran, upstream
    engine.write_text(original)
    sh("dvc", "repro", "score", cwd=repo)
    assert json.loads(sh("dvc", "status", "--json", cwd=repo).stdout) == {}

    set_params(repo, train={"epochs": 1})
    out = sh("dvc", "repro", cwd=repo).stdout
    assert "Stage 'prepare' didn't change, skipping" in out and "Running stage 'train'" in out
    diff = json.loads(sh("dvc", "metrics", "diff", "--json", cwd=repo).stdout)
    acc = diff["metrics/base.json"]["accuracy"]
    assert acc["old"] == pytest.approx(base["accuracy"])
    assert acc["new"] == pytest.approx(json.loads((repo / "metrics/base.json").read_text())["accuracy"])
    assert acc["new"] < acc["old"]  # 1 epoch is worse than 4
    plots = sh("dvc", "plots", "show", "--json", cwd=repo).stdout
    for name in ("confusion_base.csv", "grad_heatmap.csv", "entropy_topk"):
        assert name in plots, name
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "one epoch", cwd=repo)

    # a new dataset version as an experiment: only prune → retrain (and the report) re-run
    out = sh("dvc", "exp", "run", "-S", "prune.strategy=gradient-cdf", "-S", "prune.keep=0.5", cwd=repo).stdout
    assert "Running stage 'prune'" in out and "Running stage 'retrain'" in out
    assert "Running stage 'train'" not in out and "Running stage 'sweep'" not in out
    diff = json.loads(sh("dvc", "metrics", "diff", "--json", cwd=repo).stdout)
    assert "n_train" in diff["metrics/pruned.json"]
    summary = json.loads((repo / "prune/summary.json").read_text())
    assert summary["strategy"] == "gradient-cdf" and summary["n_kept"] == round(0.5 * summary["n_total"])


    # relabel as a dataset version: the diff shows the change and its verdict, in a terminal's width
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "gradient-cdf", cwd=repo)
    out = sh("dvc", "exp", "run", "-S", "prune.strategy=relabel", "-S", "flag.method=confident-dynamics", cwd=repo).stdout
    assert "Running stage 'prune'" in out and "Running stage 'retrain'" in out
    pruned = json.loads((repo / "metrics/pruned.json").read_text())
    assert {"diff", "p", "verdict"} <= set(pruned)
    details = json.loads((repo / "plots/evaluate_pruned.json").read_text())
    assert details["ci_low"] <= details["diff"] <= details["ci_high"]
    assert pruned["verdict"] in ("better", "worse", "n.s.")
    # --all: the verdict is a string, shown by a plain diff only when it changed (both versions may be "n.s.")
    text = sh("dvc", "metrics", "diff", "--all", cwd=repo).stdout
    assert "verdict" in text and "diff" in text, text
    assert max(len(line) for line in text.splitlines()) <= 120, text
    text = sh("dvc", "metrics", "show", cwd=repo).stdout
    assert max(len(line) for line in text.splitlines()) <= 120, text

    # the paper's sweep, one command away
    out = sh("dvc", "exp", "run", "-S", "sweep.keeps=[0.5]", cwd=repo).stdout
    assert "Running stage 'sweep'" in out and "Running stage 'train'" not in out
    rows = (repo / "plots/sweep.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("strategy,keep,accuracy_mean")
