"""Commands that make results visible: `clean show`, `clean report`, `clean compare`, `clean figures`.

Plain functions with Typer-annotated parameters, registered in cli/main.py with
``app.command()(fn)``. pipeline/ (and with it numpy, pandas, matplotlib) is imported inside
each command, so `clean --help` stays instant.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .ui import console, handle_errors, table


@handle_errors
def show(
    by: str = typer.Option("loss", help="score to rank by: loss, grad_norm, el2n, margin, aum, forgetting, "
                                        "confidence, variability, self_influence (margin/aum/confidence: lowest first)"),
    k: int = typer.Option(36, help="number of tiles"),
    scores: Path = typer.Option(Path("scores/scores.csv"), help="scores file from `clean score`"),
    flags: Path = typer.Option(Path("scores/flags.csv"), help="flags file from `clean flag` (used when it exists)"),
    only_flagged: bool = typer.Option(False, "--only-flagged", help="show flagged samples only"),
    out: Optional[Path] = typer.Option(None, help="PNG to write [default: reports/top_<by>.png]"),
    manifest: Optional[Path] = typer.Option(None, help="manifest the scores came from (default: scores/meta.json's)"),
    cols: Optional[int] = typer.Option(None, help="tiles per row (default: square grid)"),
):
    """Image grid of the top-k samples by a score: each tile shows id, label→prediction, score."""
    from pipeline.views.grid import class_names, namer, resolve_manifest, top_grid

    out = out or Path("reports") / f"top_{by}.png"
    use_flags = flags if (flags.exists() or only_flagged) else None
    shown = top_grid(scores, by=by, k=k, path=out, flags_csv=use_flags, only_flagged=only_flagged,
                     manifest=manifest, cols=cols)
    names = namer(class_names(resolve_manifest(scores, manifest)))
    rows = [(r.id, names(r.label), names(r.pred), float(getattr(r, by)), "yes" if r.flagged else "", r.path)
            for r in shown.head(12).itertuples(index=False)]
    console.print(table(f"top {len(shown)} by {by}" + (" (flagged only)" if only_flagged else ""),
                        ["id", "label", "pred", by, "flagged", "path"], rows))
    n_wrong = int((shown["label"] != shown["pred"]).sum())
    console.print(f"{n_wrong} of {len(shown)} shown have label ≠ prediction; wrote {out}", highlight=False)


@handle_errors
def report(
    out: Path = typer.Option(Path("reports"), help="folder for index.html and figures/"),
    manifest: Path = typer.Option(Path("data/manifest.csv"), help="dataset manifest (header: splits, classes)"),
    scores: Path = typer.Option(Path("scores/scores.csv"), help="scores file from `clean score`"),
    flags: Path = typer.Option(Path("scores/flags.csv"), help="flags file from `clean flag` (optional)"),
    metrics: Path = typer.Option(Path("metrics"), help="folder of metrics/<version>.json from `clean evaluate`"),
    plots: Path = typer.Option(Path("plots"), help="folder of confusion_<version>.csv and overlap.png"),
    sweep: Optional[Path] = typer.Option(None, help="sweep summary [default: sweep/summary.csv or plots/sweep.csv]"),
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
    from pipeline.views.report import build_report

    from .ui import RichProgress

    with RichProgress() as prog:
        r = build_report(out, manifest=manifest, scores_csv=scores, flags_csv=flags, metrics_dir=metrics,
                         plots_dir=plots, sweep_summary=sweep, dynamics=dynamics, params=params,
                         prune_summary=prune_summary, compare_scores=compare, max_per_class=max_per_class,
                         by=by, k=k, progress=prog)
    rows = [(name, "ok" if st == "ok" else st[len("missing: "):] if st.startswith("missing: ") else st)
            for name, st in r["sections"].items()]
    console.print(table(f"report → {r['path']}", ["section", "status"], rows))
    console.print(f"{r['n_flagged']} flagged, {r['n_shown']} sample cards; {r['bytes'] / 1e6:.2f} MB in "
                  f"{r['seconds']:.1f} s. Open {Path(r['path']).resolve().as_uri()}", highlight=False)


@handle_errors
def compare(
    scores_a: Path = typer.Argument(..., help="first scores.csv"),
    scores_b: Path = typer.Argument(..., help="second scores.csv (same ids, e.g. another architecture)"),
    by: str = typer.Option("grad_norm", help="score whose top-k sets are compared"),
    out: Path = typer.Option(Path("plots/overlap.csv"), help="DVC plot data (k, fraction, overlap, random_baseline)"),
    png: Optional[Path] = typer.Option(None, help="figure [default: OUT with .png]"),
):
    """Overlap |S_A,k ∩ S_B,k| / k of two score files' top-k sets vs k, against the random baseline k/N."""
    import numpy as np

    from pipeline.views.plots import overlap_topk

    png = png or out.with_suffix(".png")
    df = overlap_topk(scores_a, scores_b, by, out, png)
    n = int(round(df["k"].iloc[-1] / df["fraction"].iloc[-1]))
    from pipeline.views.compare import compare_files

    fr = [0.001, 0.01, 0.05, 0.1, 0.25, 0.5]
    ks = sorted({int(min(n, max(1, round(f * n)))) for f in fr})
    r = compare_files(scores_a, scores_b, by, ks)
    rows = [(k, f"{k / n:.1%}", float(o), float(k / n), f"{o / (k / n):.1f}×") for k, o in zip(ks, r["overlap"])]
    console.print(table(f"top-k overlap by {by}: {scores_a} vs {scores_b} (N = {n})",
                        ["k", "k/N", "overlap", "random", "vs random"], rows))
    auc = float(np.mean(df["overlap"] - df["random_baseline"]))
    console.print(f"mean excess over random on the k grid: {auc:+.3f}; wrote {out} and {png}", highlight=False)


FIGURES = ("heatmap", "entropy", "sweep", "confusion")


@handle_errors
def figures(
    which: Optional[list[str]] = typer.Argument(None, help="any of heatmap, entropy, sweep, confusion "
                                                           "[default: every one whose input exists]"),
    out: Path = typer.Option(Path("plots"), help="folder for the DVC plot data (CSV) and PNGs"),
    scores: Path = typer.Option(Path("scores/scores.csv"), help="scores file (entropy of the top-k)"),
    by: list[str] = typer.Option(["grad_norm", "loss"], help="score(s) for the entropy of the top-k; the first "
                                                             "fills the `entropy` column"),
    dynamics: Path = typer.Option(Path("models/base/dynamics.npz"), help="training dynamics (heatmap)"),
    max_samples: int = typer.Option(64, help="tracked samples shown in the heatmap"),
    sweep: Optional[Path] = typer.Option(None, help="sweep summary (accuracy vs keep) "
                                                    "[default: sweep/summary.csv or plots/sweep.csv]"),
    confusion: Path = typer.Option(Path("plots"), help="folder of confusion_<version>.csv (from clean evaluate)"),
):
    """The paper's figures as DVC plot data + PNG: gradient heatmap, top-k label entropy, sweep, confusion.

    The sweep summary (plots/sweep.csv) is its own plot data, so `sweep` writes only the PNG; the
    top-k overlap comes from `clean compare`."""
    from pipeline.views import plots
    from pipeline.views.grid import class_names, resolve_manifest

    from pipeline.errors import CleanError

    bad = [w for w in (which or []) if w not in FIGURES]
    if bad:
        raise CleanError(f"unknown figure {bad[0]!r}; choose from {', '.join(FIGURES)}")
    sweep = plots.find_sweep_summary(sweep)
    explicit = bool(which)
    todo = list(which) if which else list(FIGURES)
    inputs = {"heatmap": dynamics, "entropy": scores, "sweep": sweep}
    rows = []
    for w in todo:
        src = inputs.get(w)
        if src is not None and not src.exists() and not explicit:
            rows.append((w, "skipped", f"no {src}"))
            continue
        if w == "heatmap":
            plots.grad_heatmap(dynamics, out / "grad_heatmap.csv", out / "grad_heatmap.png", max_samples=max_samples)
            rows.append((w, "ok", f"{out}/grad_heatmap.csv, .png"))
        elif w == "entropy":
            classes = class_names(resolve_manifest(scores, None))
            plots.entropy_topk(scores, by, len(classes) if classes else None, out / "entropy_topk.csv",
                               out / "entropy_topk.png")
            rows.append((w, "ok", f"{out}/entropy_topk.csv, .png"))
        elif w == "sweep":
            plots.sweep_plot(sweep, None, out / "sweep.png")  # the summary itself is the DVC plot data
            rows.append((w, "ok", f"{out}/sweep.png"))
        elif w == "confusion":
            files = sorted(confusion.glob("confusion_*.csv")) if confusion.is_dir() else []
            if not files:
                if explicit:
                    raise CleanError(f"no {confusion}/confusion_*.csv; run `clean evaluate` first")
                rows.append((w, "skipped", f"no {confusion}/confusion_*.csv"))
            classes = class_names(resolve_manifest(scores, None)) if files else None
            for f in files:
                plots.confusion_png(f, out / f"{f.stem}.png", classes, title=f.stem[len("confusion_"):])
                rows.append((w, "ok", f"{out}/{f.stem}.png"))
    console.print(table(f"figures → {out}", ["figure", "status", "files"], rows))
