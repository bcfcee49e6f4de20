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


def _num(v, fmt: str = "{:.4f}") -> str:
    return "-" if v is None else fmt.format(v)


@handle_errors
def versions(
    all_commits: bool = typer.Option(False, "--all-commits", "-A", help="every commit's versions, not only HEAD's"),
    dir: Path = typer.Option(Path("."), "--dir", help="the DVC project"),
):
    """Your dataset versions side by side (from `dvc exp show --json`): strategy, kept, accuracy ± sd, diff, p, verdict.

    Make versions with `dvc exp run -S prune.strategy=gradient-cdf -S prune.keep=0.5`; the table fits 120 columns."""
    from rich import box
    from rich.table import Table

    from pipeline.versions import exp_show, version_rows

    rows = version_rows(exp_show(dir, all_commits))
    cells = [(r["version"], r["strategy"], r["changed"] or "", f"{_num(r['kept'], '{}')}/{_num(r['of'], '{}')}",
              _num(r["base"]), "-" if r["accuracy"] is None else f"{_num(r['accuracy'])} ± {_num(r['sd'])}",
              _num(r["diff"], "{:+.4f}"), _num(r["p"], "{:.3g}"), r["verdict"] or "-") for r in rows]
    t = Table(title="dataset versions (test accuracy, mean ± sd over train.seeds; diff and p against base)",
              title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    names = ("version", "strategy", "other params", "kept", "base", "accuracy ± sd", "diff", "p", "verdict")
    widths = [max([len(name)] + [len(c[k]) for c in cells]) for k, name in enumerate(names)]
    room = console.width - sum(widths[3:]) - 3 * len(names)  # the numbers keep their width; the names give way
    widths[0], widths[1] = min(widths[0], 16), min(widths[1], 18)
    widths[2] = max(min(widths[2], room - widths[0] - widths[1]), 5)
    cells = [tuple(v if len(v) <= w else v[: w - 1] + "…" for v, w in zip(c, widths)) for c in cells]
    for name, w in zip(names, widths):
        t.add_column(name, no_wrap=True, width=w)
    for r, c in zip(rows, cells):
        t.add_row(*c, style={"better": "green", "worse": "red"}.get(r["verdict"] or ""))
    console.print(t)


@handle_errors
def demo(
    rate: float = typer.Option(0.15, help="fraction of training labels to corrupt (noise.rate)"),
    kind: str = typer.Option("pairs", help="pairs: each corrupted label becomes a look-alike class | symmetric (noise.kind)"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="another param for this run, KEY=VALUE (repeat), e.g. train.epochs=5"),
    run: bool = typer.Option(True, "--run/--no-run", help="--no-run: only print the summary of the last demo run"),
    dir: Path = typer.Option(Path("."), "--dir", help="the DVC project (this repository, or `clean init --source digits`)"),
):
    """Plant look-alike label noise, run the pipeline as a DVC experiment, print what was found and fixed.

    `dvc exp run retrain -S noise.rate=0.15 -S noise.kind=pairs`, then precision and recall of the
    flagged label issues against the planted ones, what the new version removed, and the accuracy change."""
    from pipeline.demo import planted_summary, run_experiment

    if run:
        console.print(f"planting {rate:.0%} {kind} label noise and running prepare → … → retrain "
                      "(`dvc exp run`; a few minutes on CPU) …", highlight=False)
        run_experiment(dir, rate, kind, list(set_ or []))
    s = planted_summary(dir)
    pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    how = "class c → its paired class" if s["kind"] == "pairs" else "a random other class"
    console.print(f"planted   {s['planted']} wrong labels in {s['total']} training images (noise.rate {s['rate']:g}, "
                  f"{s['kind']}: {how})", highlight=False)
    console.print(f"found     {s['found']} of them among {s['flagged']} flagged: precision {pct(s['precision'])}, "
                  f"recall {pct(s['recall'])}", highlight=False)
    console.print(f"fixed     {s['strategy']} removed {s['removed_planted']} planted ({s['kept_planted']} left) and "
                  f"{s['removed_clean']} clean images; kept {s['kept']} of {s['total']}", highlight=False)
    sd = lambda v: "" if not v else f" ± {v:.4f}"  # noqa: E731
    diff = "-" if s["diff"] is None else f"{s['diff']:+.4f}"
    p = "" if s["p"] is None else f", p = {s['p']:.3g}"
    console.print(f"accuracy  {s['base']:.4f}{sd(s['base_sd'])} → {s['pruned']:.4f}{sd(s['pruned_sd'])} "
                  f"(change {diff}{p}: {s['verdict']})", highlight=False)
