"""The `figures` stage (`clean figures`): the paper's figures as DVC plot data (CSV) + PNG in one folder.

heatmap: per-sample gradient norm over training (figure 1, from a dynamics.npz); entropy:
label entropy of the top-k (figure 2, from scores.csv); sweep: accuracy vs keep fraction
(figure 3; the sweep summary is its own plot data, so only the PNG is written); confusion:
one matrix per confusion_<version>.csv of a folder (figure 5). The top-k overlap (figure 4)
is `clean compare`'s. Every path is an argument (the defaults are the CLI's). Which finding
each figure checks: docs/methods.md §6.1.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.errors import CleanError

#: The figures, in the order they are drawn.
FIGURES = ("heatmap", "entropy", "sweep", "confusion")


def _classes(scores_csv: Path, manifest, fallback_manifest):
    from pipeline.views.grid import class_names, resolve_manifest

    return class_names(resolve_manifest(scores_csv, manifest, fallback_manifest))


def _confusion_files(confusion_dir: Path, explicit: bool) -> list[Path]:
    """confusion_<version>.csv files in `confusion_dir` (none, when asked for by name: CleanError)."""
    files = sorted(confusion_dir.glob("confusion_*.csv")) if confusion_dir.is_dir() else []
    if not files and explicit:
        raise CleanError(f"no {confusion_dir}/confusion_*.csv; run `clean evaluate` first")
    return files


def figures(which, out_dir: str | Path, *, scores_csv: str | Path, by, dynamics: str | Path, max_samples: int,
            sweep_summary, confusion_dir: str | Path, manifest: str | Path | None = None,
            fallback_manifest: str | Path | None = None) -> list[tuple[str, str, str]]:
    """Draw the figures `which` (names from FIGURES) into `out_dir` → rows (figure, status, files).

    which: None or empty = every figure whose input exists (the others are "skipped"); named
    ones must have their input (CleanError otherwise). by: score column(s) of figure 2.
    sweep_summary: a path, or candidate paths (the first that exists). Class names come from
    classes.json beside the manifest the scores came from (`manifest`, else the one their
    meta.json names, else `fallback_manifest`).
    """
    from pipeline.io import together
    from pipeline.views import plots

    bad = [w for w in (which or []) if w not in FIGURES]
    if bad:
        raise CleanError(f"unknown figure {bad[0]!r}; choose from {', '.join(FIGURES)}")
    out, scores_csv, dynamics, confusion_dir = Path(out_dir), Path(scores_csv), Path(dynamics), Path(confusion_dir)
    sweep = plots.find_sweep_summary(sweep_summary)
    explicit = bool(which)
    inputs = {"heatmap": dynamics, "entropy": scores_csv, "sweep": sweep}
    rows = []
    with together(out):  # a figure that fails leaves every file as it was (all new or all old)
        for w in list(which) if which else list(FIGURES):
            src = inputs.get(w)
            if w in inputs and src is None and explicit:
                raise CleanError(f"figure {w} needs its input file; pass it (clean figures --help)")
            if w in inputs and (src is None or not (src.exists() or explicit)):
                rows.append((w, "skipped", f"no {src or 'input given'}"))
            elif w == "heatmap":
                plots.grad_heatmap(dynamics, out / "grad_heatmap.csv", out / "grad_heatmap.png", max_samples=max_samples)
                rows.append((w, "ok", f"{out}/grad_heatmap.csv, .png"))
            elif w == "entropy":
                classes = _classes(scores_csv, manifest, fallback_manifest)
                plots.entropy_topk(scores_csv, by, len(classes) if classes else None, out / "entropy_topk.csv",
                                   out / "entropy_topk.png")
                rows.append((w, "ok", f"{out}/entropy_topk.csv, .png"))
            elif w == "sweep":
                plots.sweep_plot(sweep, None, out / "sweep.png")  # the summary itself is the DVC plot data
                rows.append((w, "ok", f"{out}/sweep.png"))
            else:
                files = _confusion_files(confusion_dir, explicit)
                if not files:
                    rows.append((w, "skipped", f"no {confusion_dir}/confusion_*.csv"))
                classes = _classes(scores_csv, manifest, fallback_manifest) if files else None
                for f in files:
                    plots.confusion_png(f, out / f"{f.stem}.png", classes, title=f.stem[len("confusion_"):])
                    rows.append((w, "ok", f"{out}/{f.stem}.png"))
    return rows
