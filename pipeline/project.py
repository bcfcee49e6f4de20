"""`clean init`: a DVC pipeline (dvc.yaml + params.yaml) for the user's own git repository.

The stages are this repository's dvc.yaml without its code dependencies (they run the
installed `clean`), plus the source data as the prepare stage's dependency (`${data.root}`,
templated from params.yaml). The images are tracked the DVC way (`dvc add`), so a changed,
added or deleted image re-runs prepare and what follows, and `dvc push`/`dvc pull` move them.

The templates (pipeline/templates/) are generated from this repository's dvc.yaml,
params.yaml and .dvc/plots/: `python -m pipeline.project` rewrites them (tests check they are fresh).
"""
from __future__ import annotations

import csv
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.errors import CleanError
from pipeline.tools import run

TEMPLATES = Path(__file__).parent / "templates"
#: not named dvc.yaml / params.yaml: DVC would take a dvc.yaml anywhere in this repository for a pipeline of its own
DVC_TEMPLATE, PARAMS_TEMPLATE = TEMPLATES / "dvc.template.yaml", TEMPLATES / "params.template.yaml"
CODE_DIRS = ("pipeline/", "cli/", "pipeline", "cli")  # deps of this source tree, absent in a user's repo
PLOT_TEMPLATES = ("heatmap.json", "sweep.json", "topk.json")
DECISIONS = "data/decisions.csv"
HEADER = ("# Written by `clean init`: the clean pipeline for this repository; each stage runs the installed\n"
          "# `clean`. The source data (data.root in params.yaml) is the prepare stage's dependency: adding,\n"
          "# changing or deleting an image re-runs prepare and what follows. `dvc repro` runs it;\n"
          "# `dvc exp run -S prune.strategy=gradient-cdf -S prune.keep=0.5` makes a dataset version;\n"
          "# `clean versions` compares them.\n")


def user_pipeline(dev: dict) -> dict:
    """This repository's dvc.yaml (parsed) without the deps on its own code (pipeline/, cli/)."""
    out = dict(dev)
    stages = {}
    for name, st in dev["stages"].items():
        st = dict(st)
        deps = [d for d in st.get("deps", []) if not str(d).startswith(CODE_DIRS)]
        if deps:
            st["deps"] = deps
        else:
            st.pop("deps", None)
        stages[name] = st
    out["stages"] = stages
    return out


def write_templates(repo: Path) -> list[Path]:
    """Regenerate pipeline/templates/ from `repo`'s dvc.yaml, params.yaml and .dvc/plots/."""
    from pipeline.io import write_text

    dev = yaml.safe_load((repo / "dvc.yaml").read_text())
    written = {DVC_TEMPLATE: _dump(user_pipeline(dev)),
               PARAMS_TEMPLATE: (repo / "params.yaml").read_text()}
    written.update({TEMPLATES / "plots" / n: (repo / ".dvc" / "plots" / n).read_text() for n in PLOT_TEMPLATES})
    for path, text in written.items():
        write_text(path, text)
    return list(written)


def _dump(pipeline: dict) -> str:
    return yaml.safe_dump(pipeline, sort_keys=False, width=120, default_flow_style=False)


@dataclass
class Plan:
    """What `clean init` does in `target`: data deps of prepare, the folder to `dvc add`, notes."""
    target: Path
    source: str
    root: str | None
    deps: list[str] = field(default_factory=list)
    track: str | None = None          # folder to `dvc add` (None: none, or already tracked)
    notes: list[str] = field(default_factory=list)
    dvc_init: bool = False


def _git_top(target: Path) -> Path:
    r = run("git", ["rev-parse", "--show-toplevel"], target)
    if r.returncode != 0:
        raise CleanError(f"{target} is not inside a git repository: clean init sets up DVC in a git repository; "
                         f"run `git init` there first (or cd into your project)")
    return Path(r.stdout.strip()).resolve()


def _inside(path: Path, target: Path, what: str) -> str:
    """`path` (absolute) as a posix path relative to `target`; CleanError when it lies outside."""
    try:
        rel = path.resolve().relative_to(target)
    except ValueError:
        raise CleanError(
            f"{what} {path} lies outside this repository ({target}): DVC tracks data inside the repository. "
            f"Bring it in: `cp -r {path} data/raw` (then `clean init --root data/raw`), or, when it is another "
            f"DVC/git repository's data, `dvc import <repo-url> <path> -o data/raw`") from None
    if str(rel) == ".":
        raise CleanError(f"{what} is the repository root {target}: put the images in a folder of their own "
                         f"(e.g. data/raw) and give that folder")
    return rel.as_posix()


def _outs(pipeline: dict) -> list[str]:
    outs = []
    for st in pipeline["stages"].values():
        for key in ("outs", "metrics", "plots"):
            for o in st.get(key, []):
                outs.append(next(iter(o)) if isinstance(o, dict) else str(o))
    return outs


def _check_not_output(rel: str, pipeline: dict, what: str) -> None:
    for o in _outs(pipeline):
        if rel == o or rel.startswith(o.rstrip("/") + "/") or o.startswith(rel.rstrip("/") + "/"):
            raise CleanError(f"{what} {rel} overlaps the pipeline's output {o}: keep the source images in a folder "
                             f"of their own, e.g. data/raw (move them there and give --root data/raw)")


def _csv_folder(csv_path: Path) -> Path:
    """The deepest folder holding every image the CSV `csv_path` lists (paths relative to the CSV)."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise CleanError(f"cannot parse CSV {csv_path}: {e}; save it as UTF-8 CSV with columns path,label") from None
    cols = [c.strip() for c in rows[0]] if rows else []
    if "path" not in cols:
        raise CleanError(f"CSV {csv_path} has no 'path' column (found {cols}); it needs columns path,label")
    i = cols.index("path")
    paths = [os.path.normpath(os.path.join(csv_path.parent, r[i].strip())) for r in rows[1:] if len(r) > i and r[i].strip()]
    if not paths:
        raise CleanError(f"CSV {csv_path} lists no image; it needs rows of path,label")
    return Path(os.path.commonpath([os.path.dirname(p) for p in paths]))


def _tracked(rel: str, target: Path) -> bool:
    """True when `rel` (or a folder above it) already has a .dvc file; CleanError when git tracks its files."""
    parts = Path(rel).parts
    if any((target / (Path(*parts[:k]).as_posix() + ".dvc")).is_file() for k in range(1, len(parts) + 1)):
        return True
    r = run("git", ["ls-files", "--", rel], target)
    if r.stdout.strip():
        raise CleanError(f"{rel} is tracked by git: DVC tracks it instead (git keeps a small {rel}.dvc). Run "
                         f"`git rm -r --cached {rel} && git commit -m 'move {rel} to DVC'`, then clean init again")
    return False


def plan(target: str | Path, source: str, root: str | None, force: bool = False) -> Plan:
    """Check everything `clean init` needs in `target` and decide what it does; changes nothing.

    CleanError (nothing written) when target is not in a git repository, dvc.yaml/params.yaml exist
    (without `force`), or the source data is missing, outside the repository or among the outputs.
    """
    from pipeline.registry import SOURCES

    target = Path(target).resolve()
    top = _git_top(target)
    existing = [n for n in ("dvc.yaml", "params.yaml") if (target / n).exists()]
    if existing and not force:
        raise CleanError(f"{' and '.join(existing)} already exist in {target}; clean init writes both and changed "
                         f"nothing. Move them aside (e.g. `git mv dvc.yaml dvc.old.yaml`), or run `clean init --force` "
                         f"to overwrite them")
    if source not in SOURCES:
        raise CleanError(f"unknown source {source!r}; --source must be one of: {', '.join(SOURCES)}")
    if root is None and source == "imagefolder":
        root = "data/raw"
    if root is None and "root" in SOURCES[source].needs:
        raise CleanError(f"--source {source} needs --root (e.g. --root labels.csv: a CSV with columns path,label)")
    between = [target] + [d for d in target.parents if d == top or top in d.parents]  # target .. git top
    p = Plan(target, source, None, dvc_init=not any((d / ".dvc").is_dir() for d in between))
    if root is None:
        p.notes.append(f"{source}: read from where it is installed (not a DVC dependency)" if source != "digits"
                       else "digits: the bundled scikit-learn digits (no data to track)")
        return p
    pipeline = yaml.safe_load(DVC_TEMPLATE.read_text())
    path = Path(root) if Path(root).is_absolute() else target / root
    if not path.exists():
        kind = "a folder root/<class>/<image>" if source != "csv" else "a CSV with columns path,label"
        raise CleanError(f"--root {root}: no such {'file' if source == 'csv' else 'folder'} in {target}; "
                         f"give {kind} inside this repository (e.g. copy your images to data/raw)")
    p.root = _inside(path, target, "--root")
    folder = p.root
    if source == "csv":
        if not path.is_file():
            raise CleanError(f"--root {root} is a folder; --source csv takes the CSV file (columns path,label)")
        folder = _inside(_csv_folder(path), target, "the folder holding the CSV's images")
    _check_not_output(folder, pipeline, "the source data")
    _check_not_output(p.root, pipeline, "--root")
    p.deps = ["${data.root}"] + ([folder] if folder != p.root and not p.root.startswith(folder + "/") else [])
    p.track = None if _tracked(folder, target) else folder
    return p


def _params_text(source: str, root: str | None) -> str:
    text = PARAMS_TEMPLATE.read_text()
    value = "null" if root is None else (root if re.fullmatch(r"[\w./-]+", root) else yaml.safe_dump(root).split("\n")[0])
    text = re.sub(r"^(  source: )\S+", lambda m: m.group(1) + source, text, count=1, flags=re.M)
    text = re.sub(r"^(  root: )null", lambda m: m.group(1) + value, text, count=1, flags=re.M)
    from pipeline.params import _yaml, validate

    p = validate(_yaml(text), where="params.yaml (clean init)")
    assert p["data"]["source"] == source and p["data"]["root"] == root, "params.yaml template lost data.source/root"
    return text


def _pipeline_text(deps: list[str]) -> str:
    pipeline = yaml.safe_load(DVC_TEMPLATE.read_text())
    prepare = pipeline["stages"]["prepare"]
    staged = {}
    for k, v in prepare.items():  # deps right after cmd, as DVC writes them
        staged[k] = v
        if k == "cmd" and deps:
            staged["deps"] = deps + [d for d in prepare.get("deps", []) if d not in deps]
    pipeline["stages"]["prepare"] = staged
    return HEADER + _dump(pipeline)


def init(target: str | Path, source: str, root: str | None, force: bool = False) -> Plan:
    """`clean init`: dvc init (if needed), `dvc add` the source data, write dvc.yaml, params.yaml,
    the plot templates (.dvc/plots/) and data/decisions.csv (header only) in `target`.

    Every check runs before anything is written (see :func:`plan`). Returns the Plan carried out.
    """
    from pipeline.decisions import ensure_file
    from pipeline.io import write_text

    p = plan(target, source, root, force)
    if p.dvc_init:
        r = run("dvc", ["init", "-q"] + ([] if p.target == _git_top(p.target) else ["--subdir"]), p.target)
        if r.returncode != 0:
            raise CleanError(f"`dvc init` failed in {p.target}: {(r.stderr or r.stdout).strip()}")
    if p.track:
        r = run("dvc", ["add", "-q", p.track], p.target)
        if r.returncode != 0:
            raise CleanError(f"`dvc add {p.track}` failed: {(r.stderr or r.stdout).strip()}")
    plots = next(d for d in (p.target, *p.target.parents) if (d / ".dvc").is_dir()) / ".dvc" / "plots"
    for n in PLOT_TEMPLATES:
        if force or not (plots / n).exists():
            write_text(plots / n, (TEMPLATES / "plots" / n).read_text())
    ensure_file(p.target / DECISIONS)
    write_text(p.target / "params.yaml", _params_text(source, p.root))
    write_text(p.target / "dvc.yaml", _pipeline_text(p.deps))
    return p


if __name__ == "__main__":
    for f in write_templates(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]):
        print(f"wrote {f}")
