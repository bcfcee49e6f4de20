"""The `report` stage: every result file → `out_dir`/index.html (+ the figures under `out_dir`/figures/).

Reads params, the manifest and classes, the scores (+ meta.json, flags), the metrics of each
evaluated version, the prune summary, the training dynamics, the sweep summary, confusion
data and a second score file, each from the path it is given (the defaults are the CLI's:
`clean report --help`), and hands them to the section renderers of pipeline/views/report.py.
Every input but the scores is optional: a missing one turns its section into a note saying
what to run; a bad file that exists raises CleanError naming it. What each figure checks:
docs/methods.md §6.1.
"""
from __future__ import annotations

import time
from pathlib import Path

from pipeline.errors import CleanError
from pipeline.formats.jsonfile import read_json
from pipeline.formats.manifest import classes_path_for, read_classes, read_manifest
from pipeline.io import write_text
from pipeline.params import load_params
from pipeline.registry import SCORES
from pipeline.stages.evaluate import details_path
from pipeline.views.grid import class_names, namer, resolve_manifest
from pipeline.views.plots import find_sweep_summary
from pipeline.views.report import (confusion_section, entropy_section, flagged_section, heatmap_section,
                                   overlap_section, render_page, scores_section, section, summary_section,
                                   sweep_section, top_section, importance_section)
from pipeline.views.report import issues_section

_NO_FLAGS = {"n_flagged": 0, "n_shown": 0, "ids": []}


# --------------------------------------------------------------------------- inputs


def _read_json(path: Path):
    return read_json(path, "not found", "re-run the stage that writes it")


def _load_params(path: Path) -> tuple[dict | None, str | None]:
    """params.yaml validated → (params, None); invalid → (its raw mapping or None, the error)."""

    if not path.exists():
        return None, f"{path} not found; the header shows defaults only"
    try:
        return load_params(path), None
    except CleanError as e:
        import yaml

        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except Exception:  # noqa: BLE001
            raw = None
        return raw if isinstance(raw, dict) else None, str(e)


def _metrics(metrics_dir: Path, plots_dir: Path | None = None) -> dict[str, dict]:
    """metrics_dir/<version>.json with an accuracy → {version: metrics}, base first; each merged
    with its details (per-class accuracy, runs) from plots_dir/evaluate_<version>.json."""

    out = {}
    if not metrics_dir.is_dir():
        return out
    for p in sorted(metrics_dir.glob("*.json")):
        m = _read_json(p)
        if isinstance(m, dict) and "accuracy" in m:
            dp = details_path(plots_dir, p.stem) if plots_dir is not None else None
            d = _read_json(dp) if dp is not None and dp.exists() else None
            out[p.stem] = {**(d if isinstance(d, dict) else {}), **m}
    order = sorted(out, key=lambda n: (n != "base", n))
    return {n: out[n] for n in order}


def _dataset(scores_csv: Path, manifest: Path) -> dict:
    """The manifest that resolves image paths (the scores' meta.json's, else `manifest`), the one
    the header describes (`manifest`, else that one), its rows and the class names."""

    img_manifest = resolve_manifest(scores_csv, None, fallback=manifest)
    head = manifest if manifest.exists() else img_manifest
    mdf = read_manifest(head) if head is not None else None
    classes = class_names(head) if head is not None else None
    if classes is None and classes_path_for(manifest).exists():
        classes = read_classes(classes_path_for(manifest))["classes"]
    return {"img_manifest": img_manifest, "manifest": head, "mdf": mdf, "classes": classes, "names": namer(classes)}


def _read_inputs(params: Path, manifest: Path, scores_csv: Path, metrics_dir: Path, prune_summary: Path,
                 plots_dir: Path | None = None) -> dict:
    """Everything the header needs (read before the scores, so their errors come first)."""
    p, p_err = _load_params(params)
    meta_path = scores_csv.parent / "meta.json"
    meta = _read_json(meta_path) if meta_path.exists() else {}
    ds = _dataset(scores_csv, manifest)
    metrics = _metrics(metrics_dir, plots_dir)
    prune = _read_json(prune_summary) if prune_summary.exists() else None
    return {"p": p, "p_err": p_err, "params_path": params, "meta": meta, **ds, "metrics": metrics,
            "prune": prune, "prune_path": prune_summary}


def _read_scored(scores_csv: Path, flags_csv: Path, by: str):
    """scores.csv joined with flags.csv when it exists → (DataFrame, has_flags); `by` must have values."""
    import numpy as np

    from pipeline.formats.tables import join_flags, read_flags, read_scores

    df = read_scores(scores_csv, ["path", "pred"])
    if by not in df.columns or df[by].isna().all():
        raise CleanError(f"{scores_csv}: no values in score column '{by}'; pick another (--by), one of "
                         f"{', '.join(c for c in SCORES.names() if c in df.columns)}")
    has_flags = flags_csv.exists()
    if has_flags:
        df = join_flags(df, read_flags(flags_csv), flags_csv)
    else:
        df["flagged"], df["rule"], df["flag_value"] = False, "", np.nan
    return df, has_flags


# --------------------------------------------------------------------------- sections


def _issues(ins: dict, flags_csv: Path | None, img: Path | None):
    """The issue-type section: flags.csv's is_<type> columns, scores/issues.json beside it, the manifest rows."""
    from pipeline.formats.tables import read_flags

    if ins["mdf"] is None:
        from pipeline.views.report import section

        sec = section("issues")
        sec.missing("no manifest to show the images of each issue type (pass --manifest)")
        return sec
    flags = read_flags(flags_csv, heldout=True) if flags_csv is not None else None
    found = {}
    if flags_csv is not None and (flags_csv.parent / "issues.json").exists():
        found = read_json(flags_csv.parent / "issues.json", "not found", "re-run `clean flag`")
    return issues_section(flags, found, ins["mdf"], ins["names"], img.parent if img is not None else None)


def _score_sections(ins: dict, scores_csv: Path, flags_csv: Path, by: str, k: int, figs: Path,
                    max_per_class: int, max_table_rows: int, log):
    """Flagged cards, top-k grid, score distributions, figure 2 → ([flagged, top, scores], entropy, df, info)."""

    if not scores_csv.exists():
        secs = [section(key, k=k, by=by) for key in ("flagged", "issues", "top", "importance", "scores", "entropy")]
        for s in secs:
            s.missing(f"no scores file ({scores_csv}); run `clean score` (dvc repro score)")
        return secs[:5], secs[5], None, _NO_FLAGS
    df, has_flags = _read_scored(scores_csv, flags_csv, by)
    img = ins["img_manifest"]
    if img is not None:  # the images shown are the manifest's, never a path written in scores.csv
        from pipeline.views.grid import manifest_paths

        df = manifest_paths(df, img, strict=False)
    flagged, info = flagged_section(df, has_flags, flags_csv, ins["names"], img.parent if img is not None else None,
                                    by, max_per_class, max_table_rows, log)
    issues = _issues(ins, flags_csv if has_flags else None, img)
    top = top_section(scores_csv, by, k, figs, flags_csv if has_flags else None, ins["classes"], img)
    log("report: flagged samples and top-k grid")
    cols = [c for c in SCORES.names() if c in df.columns and df[c].notna().any()]
    dist = scores_section(df, cols, has_flags, figs)
    ent = entropy_section(scores_csv, cols, ins["classes"], figs)
    log("report: score distributions, entropy")
    return [flagged, issues, top, importance_section(df, ins["names"]), dist], ent, df, info


def report(out_dir: str | Path, *, manifest: str | Path, scores_csv: str | Path, flags_csv: str | Path,
           metrics_dir: str | Path, plots_dir: str | Path, sweep_summary, dynamics: str | Path,
           params: str | Path, prune_summary: str | Path, compare_scores: str | Path | None = None,
           max_per_class: int = 24, by: str = "loss", k: int = 36, max_table_rows: int = 1000,
           progress=None) -> dict:
    """Write `out_dir`/index.html (all images embedded) + figures under `out_dir`/figures/.

    max_per_class: flagged cards per class (also capped at 1500 cards and 12 MB of thumbnails
    in total). by: score used to order samples when there is no flags file, and for the
    top-k grid of `k` tiles. sweep_summary: a path, or candidate paths (the first that
    exists), or None (its section says none was given). compare_scores: a second scores.csv
    for the top-k overlap figure (else `plots_dir`/overlap.png from `clean compare` is shown
    if present). Returns {"path", "bytes", "seconds", "n_flagged", "n_shown", "shown_ids", "sections"}.
    """

    t0 = time.perf_counter()
    if isinstance(max_per_class, bool) or not isinstance(max_per_class, int) or max_per_class < 1:
        raise CleanError(f"max_per_class must be a positive integer, got {max_per_class!r}")
    out_dir, scores_csv, flags_csv, plots_dir = Path(out_dir), Path(scores_csv), Path(flags_csv), Path(plots_dir)
    figs = out_dir / "figures"

    def log(msg: str) -> None:
        if progress:
            progress("log", message=msg)

    ins = _read_inputs(Path(params), Path(manifest), scores_csv, Path(metrics_dir), Path(prune_summary), plots_dir)
    head = summary_section(ins["p"], ins["p_err"], ins["params_path"], ins["manifest"], ins["mdf"], ins["classes"],
                           ins["meta"], ins["metrics"], ins["prune"], ins["prune_path"])
    log("report: header")
    scored, ent, df, info = _score_sections(ins, scores_csv, flags_csv, by, k, figs, max_per_class,
                                            max_table_rows, log)
    sections = [head, *scored, heatmap_section(Path(dynamics), figs), ent,
                sweep_section(find_sweep_summary(sweep_summary), figs),
                overlap_section(scores_csv, compare_scores, df is not None, plots_dir, figs),
                confusion_section(plots_dir, ins["classes"], figs)]
    log("report: figures")
    page = render_page(ins["p"], sections, 0 if df is None else len(df), info["n_flagged"], ins["metrics"])
    out = out_dir / "index.html"
    write_text(out, page)
    return {"path": str(out), "bytes": len(page.encode("utf-8")), "seconds": round(time.perf_counter() - t0, 3),
            "n_flagged": info["n_flagged"], "n_shown": info["n_shown"], "shown_ids": info["ids"],
            "sections": {s.key: s.status for s in sections}}
