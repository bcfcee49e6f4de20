"""`clean init`: the clean pipeline for your own git repository (pipeline/project.py).

A plain function with Typer-annotated parameters, registered in cli/main.py with
``app.command()(fn)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .ui import console, handle_errors


@handle_errors
def init(
    source: str = typer.Option("imagefolder", help="imagefolder | csv | fashion-mnist | digits (params: data.source)"),
    root: Optional[str] = typer.Option(None, help="the source data inside this repository: a folder root/<class>/<image> "
                                       "(imagefolder, default data/raw), a CSV of path,label (csv), an IDX folder"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing dvc.yaml / params.yaml"),
    dir: Path = typer.Option(Path("."), "--dir", help="the project folder (in a git repository) to set up"),
):
    """Set up the clean pipeline in your git repository: dvc.yaml + params.yaml, the data tracked by DVC.

    Runs `dvc init` when needed and `dvc add`s the source images, so adding, changing or deleting an
    image re-runs prepare and what follows, and `dvc push` / `dvc pull` move the images."""
    from pipeline.project import init as run

    p = run(dir, source, root, force)
    console.print(f"[green]clean init[/]: wrote dvc.yaml and params.yaml in {p.target} "
                  f"(data.source {p.source}, data.root {p.root or 'null'})", highlight=False)
    if p.dvc_init:
        console.print("ran `dvc init`", highlight=False)
    if p.track:
        console.print(f"tracked {p.track} with DVC (`dvc add {p.track}` → {p.track}.dvc)", highlight=False)
    elif p.deps:
        console.print(f"{p.deps[-1] if len(p.deps) > 1 else p.root} is already tracked by DVC", highlight=False)
    for n in p.notes:
        console.print(n, highlight=False)
    add = " ".join(["dvc.yaml", "params.yaml", "data/decisions.csv", ".dvc", ".dvcignore"]
                   + ([f"{p.track}.dvc", str(Path(p.track).parent / ".gitignore")] if p.track else []))
    console.print("next:\n"
                  f"  git add {add} && git commit -m 'clean pipeline'\n"
                  "  dvc repro                  # prepare → train → score → flag → prune → retrain → report\n"
                  "  dvc remote add -d store <url> && dvc push   # the images and results, for a colleague's `dvc pull`",
                  highlight=False)
