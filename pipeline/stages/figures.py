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


def _confusion(out: Path, confusion_dir: Path, explicit: bool, classes) -> list[tuple[str, str, str]]:
    """Figure 5 for each confusion_<version>.csv in `confusion_dir` (none: an error when asked for)."""
    from pipeline.views.plots import confusion_png

    files = sorted(confusion_dir.glob("confusion_*.csv")) if confusion_dir.is_dir() else []
    if not files:
        if explicit:
            raise CleanError(f"no {confusion_dir}/confusion_*.csv; run `clean evaluate` first")
        return [("confusion", "skipped", f"no {confusion_dir}/confusion_*.csv")]
    names = classes()
    rows = []
    for f in files:
        confusion_png(f, out / f"{f.stem}.png", names, title=f.stem[len("confusion_"):])
        rows.append(("confusion", "ok", f"{out}/{f.stem}.png"))
    return rows


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
    from pipeline.views import plots

    bad = [w for w in (which or []) if w not in FIGURES]
    if bad:
        raise CleanError(f"unknown figure {bad[0]!r}; choose from {', '.join(FIGURES)}")
    out, scores_csv, dynamics = Path(out_dir), Path(scores_csv), Path(dynamics)
    sweep = plots.find_sweep_summary(sweep_summary)
    explicit = bool(which)
    inputs = {"heatmap": dynamics, "entropy": scores_csv, "sweep": sweep}
    rows = []
    for w in list(which) if which else list(FIGURES):
        src = inputs.get(w, Path("."))
        if src is None or (not src.exists() and not explicit):
            rows.append((w, "skipped", f"no {src if src is not None else 'sweep summary given'}"))
            continue
        if w == "heatmap":
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
            rows += _confusion(out, Path(confusion_dir), explicit,
                               lambda: _classes(scores_csv, manifest, fallback_manifest))
    return rows
