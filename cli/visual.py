"""Commands that make results visible: `clean show`, `clean report`, `clean compare`, `clean figures`.

Plain functions with Typer-annotated parameters, registered in cli/main.py with
``app.command()(fn)``. Each parses its options (the default paths are the DVC layout and are
written here only, so --help shows them), calls one pipeline function and prints. pipeline/
(and with it numpy, pandas, matplotlib) is imported inside each command, so `clean --help`
stays instant; the figure names come from pipeline/stages/figures.py, which imports nothing heavy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.stages.figures import FIGURES

from .options import guard
from .ui import console, handle_errors, table

BY_HELP = ("score column of scores.csv to rank by, most suspicious first (lowest first for the scores "
           "where low is suspicious; docs/methods.md §1.1)")
MANIFEST_HELP = ("manifest the scores came from: when given, it is used; else the one scores/meta.json names, "
                 "else this default")
SWEEP_HELP = "sweep summary (accuracy vs keep); the first of these that exists (repeat --sweep to list several)"
#: Where the sweep summary may be: the sweep stage's name, then `clean sweep collect`'s.
SWEEP_SUMMARIES = [Path("sweep/summary.csv"), Path("plots/sweep.csv")]


_io = guard  # the one output check (cli/options.py)


def _model_of(dynamics: Path) -> list:
    """A dynamics.npz is read from a model folder: that folder is an input too."""
    return [("the model folder of --dynamics", dynamics.parent)] if dynamics.is_file() else []


def _read(scores: Path, manifest: Path) -> list:
    """What every view reads: the scores, the flags beside them, the manifest and its classes.json."""
    from pipeline.formats.manifest import classes_path_for

    return [("--scores", scores), ("--manifest", manifest), ("the classes.json of --manifest", classes_path_for(manifest))]


def _manifests(ctx: typer.Context, manifest: Path) -> tuple[Optional[Path], Path]:
    """(--manifest when given on the command line, else None; the fallback when meta.json names none)."""
    source = ctx.get_parameter_source("manifest")
    return (None if source is not None and source.name == "DEFAULT" else manifest), manifest


@handle_errors
def show(
    ctx: typer.Context,
    by: str = typer.Option("loss", help=BY_HELP),
    k: int = typer.Option(36, help="number of tiles"),
    scores: Path = typer.Option(Path("scores/scores.csv"), help="scores file from `clean score`"),
    flags: Path = typer.Option(Path("scores/flags.csv"), help="flags file from `clean flag` (used when it exists)"),
    only_flagged: bool = typer.Option(False, "--only-flagged", help="show flagged samples only"),
    issue: Optional[str] = typer.Option(None, help="show one issue type of flags.csv (label, duplicate, outlier, dark, ...), most severe first"),
    out: Optional[Path] = typer.Option(None, help="PNG to write (default: reports/top_<by>.png)"),
    manifest: Path = typer.Option(Path("data/manifest.csv"), help=MANIFEST_HELP),
    cols: Optional[int] = typer.Option(None, help="tiles per row (default: square grid)"),
):
    """Image grid of the top-k samples by a score: each tile shows id, label→prediction, score."""
    from pipeline.paths import check_name
    from pipeline.views.grid import resolve_manifest, show_top

    if out is None:
        check_name("--issue" if issue else "--by", issue or by, "reports/top_<by>.png")
        out = Path("reports") / f"top_{issue or by}.png"
    used = resolve_manifest(scores, *_manifests(ctx, manifest)) or manifest
    _io("show", [*_read(scores, used), ("--flags", flags)], [("--out", out)], used)
    r = show_top(scores, by, k, out, flags, only_flagged, *_manifests(ctx, manifest), cols, issue)
    shown, names = r["shown"], r["names"]
    if issue:
        by, only_flagged = f"{issue}_score", True
    rows = [(s.id, names(s.label), names(s.pred), float(getattr(s, by)), "yes" if s.flagged else "", s.path)
            for s in shown.head(12).itertuples(index=False)]
    console.print(table(f"top {len(shown)} by {by}" + (" (flagged only)" if only_flagged else ""),
                        ["id", "label", "pred", by, "flagged", "path"], rows))
    console.print(f"{r['n_wrong']} of {len(shown)} shown have label ≠ prediction; wrote {out}", highlight=False)


@handle_errors
def report(
    out: Path = typer.Option(Path("reports"), help="folder for index.html and figures/"),
    manifest: Path = typer.Option(Path("data/manifest.csv"), help="dataset manifest (header: splits, classes)"),
    scores: Path = typer.Option(Path("scores/scores.csv"), help="scores file from `clean score`"),
    flags: Path = typer.Option(Path("scores/flags.csv"), help="flags file from `clean flag` (optional)"),
    metrics: Path = typer.Option(Path("metrics"), help="folder of metrics/<version>.json from `clean evaluate`"),
    plots: Path = typer.Option(Path("plots"), help="folder of confusion_<version>.csv and overlap.png"),
    sweep: list[Path] = typer.Option(SWEEP_SUMMARIES, help=SWEEP_HELP),
    dynamics: Path = typer.Option(Path("models/base/dynamics.npz"), help="training dynamics for the gradient heatmap"),
    prune_summary: Path = typer.Option(Path("prune/summary.json"), help="prune summary (optional)"),
    compare: Optional[Path] = typer.Option(None, help="a second scores.csv for the top-k overlap figure"),
    by: str = typer.Option("loss", help="score for the top-k grid and for ordering when nothing is flagged"),
    k: int = typer.Option(36, help="tiles in the top-k grid"),
    max_per_class: int = typer.Option(24, help="flagged samples shown per class (the rest are counted)"),
    params: Path = typer.Option(Path("params.yaml"), "--params", help="params.yaml shown in the header"),
):
    """Write reports/index.html: flagged images per class, score distributions, figures, accuracy per version.

    Self-contained (images embedded); open it from disk."""
    from pipeline.paths import check_name
    from pipeline.stages.report import report as run

    from .ui import RichProgress

    check_name("--by", by, "<out>/figures/top_<by>.png")
    ins = [*_read(scores, manifest), ("--flags", flags), ("--metrics", metrics), ("--plots", plots),
           *[("--sweep", f) for f in sweep], ("--dynamics", dynamics),
           *_model_of(dynamics), ("--prune-summary", prune_summary), ("--compare", compare), ("--params", params)]
    _io("report", ins, [("--out", out / "index.html"), ("--out", out / "figures")], manifest, params)

    with RichProgress() as prog:
        r = run(out, manifest=manifest, scores_csv=scores, flags_csv=flags, metrics_dir=metrics, plots_dir=plots,
                sweep_summary=sweep, dynamics=dynamics, params=params, prune_summary=prune_summary,
                compare_scores=compare, max_per_class=max_per_class, by=by, k=k, progress=prog)
    rows = [(name, "ok" if st == "ok" else st[len("missing: "):] if st.startswith("missing: ") else st)
            for name, st in r["sections"].items()]
    console.print(table(f"report → {r['path']}", ["section", "status"], rows))
    console.print(f"{r['n_flagged']} flagged, {r['n_shown']} sample cards; {r['bytes'] / 1e6:.2f} MB in "
                  f"{r['seconds']:.1f} s. Open {Path(r['path']).resolve().as_uri()}", highlight=False)


def _files(folder: Path, pattern: str, label: str) -> list:
    """The files a view reads from a folder (the folder itself may also hold outputs)."""
    return [(label, f) for f in sorted(folder.glob(pattern)) if f.is_file()] if folder.is_dir() else []


@handle_errors
def compare(
    scores_a: Path = typer.Argument(..., help="first scores.csv"),
    scores_b: Path = typer.Argument(..., help="second scores.csv (same ids, e.g. another architecture)"),
    by: str = typer.Option("grad_norm", help="score whose top-k sets are compared"),
    out: Path = typer.Option(Path("plots/overlap.csv"), help="DVC plot data (k, fraction, overlap, random_baseline)"),
    png: Optional[Path] = typer.Option(None, help="figure (default: OUT with .png)"),
):
    """Overlap |S_A,k ∩ S_B,k| / k of two score files' top-k sets vs k, against the random baseline k/N."""
    from pipeline.views.plots import compare_topk

    png = png or out.with_suffix(".png")
    _io("compare", [("SCORES_A", scores_a), ("SCORES_B", scores_b)], [("--out", out), ("--png", png)])
    r = compare_topk(scores_a, scores_b, by, out, png)
    n = r["n"]
    rows = [(k, f"{k / n:.1%}", o, float(k / n), f"{o / (k / n):.1f}×") for k, o in zip(r["k"], r["overlap"])]
    console.print(table(f"top-k overlap by {by}: {scores_a} vs {scores_b} (N = {n})",
                        ["k", "k/N", "overlap", "random", "vs random"], rows))
    console.print(f"mean excess over random on the k grid: {r['mean_excess']:+.3f}; wrote {out} and {png}",
                  highlight=False)


@handle_errors
def figures(
    ctx: typer.Context,
    which: Optional[list[str]] = typer.Argument(None, help=f"any of {', '.join(FIGURES)} "
                                                           "(default: every one whose input exists)"),
    out: Path = typer.Option(Path("plots"), help="folder for the DVC plot data (CSV) and PNGs"),
    scores: Path = typer.Option(Path("scores/scores.csv"), help="scores file (entropy of the top-k)"),
    by: list[str] = typer.Option(["grad_norm", "loss"], help="score(s) for the entropy of the top-k; the first "
                                                             "fills the `entropy` column"),
    dynamics: Path = typer.Option(Path("models/base/dynamics.npz"), help="training dynamics (heatmap)"),
    max_samples: int = typer.Option(64, help="tracked samples shown in the heatmap"),
    sweep: list[Path] = typer.Option(SWEEP_SUMMARIES, help=SWEEP_HELP),
    confusion: Path = typer.Option(Path("plots"), help="folder of confusion_<version>.csv (from clean evaluate)"),
    manifest: Path = typer.Option(Path("data/manifest.csv"), help=MANIFEST_HELP + " (class names)"),
):
    """The paper's figures as DVC plot data + PNG: gradient heatmap, top-k label entropy, sweep, confusion.

    The sweep summary (plots/sweep.csv) is its own plot data, so `sweep` writes only the PNG; the
    top-k overlap comes from `clean compare`."""
    from pipeline.stages.figures import figures as run

    given, fallback = _manifests(ctx, manifest)
    names = ["grad_heatmap.csv", "grad_heatmap.png", "entropy_topk.csv", "entropy_topk.png", "sweep.png"]
    names += [f"{f.stem}.png" for f in sorted(confusion.glob("confusion_*.csv"))] if confusion.is_dir() else []
    _io("figures", [("--scores", scores), ("--dynamics", dynamics), *_model_of(dynamics), *[("--sweep", f) for f in sweep],
                    *_files(confusion, "confusion_*.csv", "--confusion"), ("--manifest", manifest)],
        [("--out", out / n) for n in names])
    rows = run(which, out, scores_csv=scores, by=by, dynamics=dynamics, max_samples=max_samples,
               sweep_summary=sweep, confusion_dir=confusion, manifest=given, fallback_manifest=fallback)
    console.print(table(f"figures → {out}", ["figure", "status", "files"], rows))
