"""`clean report`: one self-contained HTML page (reports/index.html) that shows every result.

Sections: header (dataset, model, params, accuracy of each evaluated version, prune summary),
flagged samples per class (thumbnails with id, label→pred, rule and scores), the top-k grid,
score distributions, and the paper's figures (gradient heatmap, entropy of the top-k,
accuracy vs keep fraction, top-k overlap of two score files, confusion matrices).

Every image is embedded as a base64 PNG data: URI, so the page opens from disk with no server
and can be copied anywhere; the figure PNGs (and their CSV data) are also kept under
reports/figures/. A missing optional input (no flags yet, no sweep, no second score file)
turns its section into a note saying what to run; nothing else fails. At 60k samples the page
stays small: thumbnails are capped per class and in total bytes, the flagged table is capped.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import time
from pathlib import Path

import numpy as np

from pipeline.errors import CleanError

#: Thumbnails larger than this (longer side, px) are shrunk; smaller ones are scaled by CSS.
THUMB_PX = 96
#: Embedded thumbnails stop (text-only cards) once they take this many bytes.
THUMB_BUDGET = 12_000_000
#: At most this many cards over all classes.
MAX_CARDS = 1500
#: Score columns shown on each card when present.
CARD_SCORES = ("loss", "grad_norm", "margin", "self_influence")

_CSS = """
body{font-family:system-ui,-apple-system,'DejaVu Sans',sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header{background:#23395d;color:#fff;padding:14px 24px}header h1{margin:0 0 4px;font-size:22px}
header .sub{opacity:.85;font-size:13px}nav{padding:6px 24px;background:#e8edf4;font-size:13px;position:sticky;top:0;z-index:2}
nav a{margin-right:14px;color:#23395d;text-decoration:none}main{padding:8px 24px 40px}
section{background:#fff;border:1px solid #e2e2e2;border-radius:6px;padding:10px 16px;margin:14px 0}
h2{font-size:18px;margin:6px 0 10px}h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0}th,td{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f1f3f6}td.l,th.l{text-align:left}.note{color:#8a5a00;background:#fff6e0;border-left:4px solid #f0b400;padding:6px 10px;font-size:13px;margin:6px 0}
.cards{display:flex;flex-wrap:wrap;gap:6px}.card{width:136px;border:1px solid #ddd;border-radius:4px;padding:4px;font-size:10.5px;line-height:1.3;background:#fff;margin:0}
.card img{display:block;width:96px;height:96px;object-fit:contain;margin:0 auto 2px;image-rendering:pixelated;background:#000}
.card .noimg{width:96px;height:96px;margin:0 auto 2px;background:#eee;color:#888;display:flex;align-items:center;justify-content:center}
.card.wrong .lp{color:#c81e1e;font-weight:bold}.card .rule{color:#666;word-break:break-word}.card .id{font-weight:bold}
.fig{max-width:100%;border:1px solid #eee;margin:6px 0}.figs{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.figs .fig{max-width:560px}details>summary{cursor:pointer;font-weight:600;margin:6px 0}pre{font-size:12px;background:#f5f5f5;padding:8px;overflow:auto}
.kv td:first-child{text-align:left;color:#555}.kv td{text-align:left}.small{font-size:12px;color:#555}
"""


# --------------------------------------------------------------------------- small helpers


def _e(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _num(v, digits: int = 4) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return _e(v)
    if v != v:
        return "–"
    if v == int(v) and abs(v) < 1e12:
        return f"{int(v):,}" if abs(v) >= 1000 else str(int(v))
    return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.{digits}g}"


def _table(columns: list[str], rows, left: int = 1, cls: str = "") -> str:
    """HTML table; the first `left` columns are left-aligned text, the rest numbers."""
    head = "".join(f"<th class='l'>{_e(c)}</th>" if i < left else f"<th>{_e(c)}</th>" for i, c in enumerate(columns))
    body = []
    for r in rows:
        cells = "".join(f"<td class='l'>{_e(v)}</td>" if i < left else f"<td>{_num(v)}</td>" for i, v in enumerate(r))
        body.append(f"<tr>{cells}</tr>")
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _note(text: str) -> str:
    return f"<div class='note'>{_e(text)}</div>"


def png_data_uri(data: bytes) -> str:
    """PNG bytes → 'data:image/png;base64,...'."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _img_file(path: Path, alt: str) -> str:
    return f"<img class='fig' alt='{_e(alt)}' src='{png_data_uri(Path(path).read_bytes())}'>"


def thumbnail_png(img_u8: np.ndarray) -> bytes:
    """One uint8 image [C,H,W] → PNG bytes (native size; shrunk to THUMB_PX if larger)."""
    from PIL import Image

    from pipeline.views.grid import to_pil

    im = to_pil(img_u8)
    if max(im.size) > THUMB_PX:
        im.thumbnail((THUMB_PX, THUMB_PX), Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


class _Section:
    """Collects one section's HTML; run(fn) turns a CleanError into a note."""

    def __init__(self, key: str, title: str):
        self.key, self.title, self.parts, self.status = key, title, [], "ok"

    def add(self, s: str) -> None:
        self.parts.append(s)

    def missing(self, why: str) -> None:
        self.status = f"missing: {why}"
        self.add(_note(why))

    def html(self) -> str:
        return f"<section id='{self.key}'><h2>{_e(self.title)}</h2>{''.join(self.parts)}</section>"


# --------------------------------------------------------------------------- inputs


def _load_params(path: Path) -> tuple[dict | None, str | None]:
    from pipeline.params import load_params

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


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CleanError(f"{path}: not valid JSON ({e}); re-run the stage that writes it") from None


def _metrics(metrics_dir: Path) -> dict[str, dict]:
    out = {}
    if not metrics_dir.is_dir():
        return out
    for p in sorted(metrics_dir.glob("*.json")):
        m = _read_json(p)
        if isinstance(m, dict) and "accuracy" in m:
            out[p.stem] = m
    order = sorted(out, key=lambda n: (n != "base", n))
    return {n: out[n] for n in order}


# --------------------------------------------------------------------------- sections


def _header(sec: _Section, p: dict | None, p_err: str | None, params_path: Path, manifest: Path | None,
            mdf, classes, meta: dict, metrics: dict, prune: dict | None, prune_path: Path) -> None:
    rows = []
    data = (p or {}).get("data", {}) if isinstance(p, dict) else {}
    model = (p or {}).get("model", {}) if isinstance(p, dict) else {}
    data = data if isinstance(data, dict) else {}
    model = model if isinstance(model, dict) else {}
    if data:
        rows.append(("dataset", f"{data.get('source')}" + (f" ({data.get('root')})" if data.get("root") else "")))
    if manifest is not None:
        rows.append(("manifest", str(manifest)))
    if mdf is not None:
        counts = mdf["split"].value_counts()
        rows.append(("samples", ", ".join(f"{s}: {int(counts.get(s, 0)):,}" for s in ("train", "val", "test"))))
        if "noisy" in mdf.columns and int(mdf["noisy"].sum()):
            rows.append(("injected label noise", f"{int(mdf['noisy'].sum()):,} training labels changed"))
    if classes:
        shown = ", ".join(classes[:20]) + (f", … ({len(classes)} in all)" if len(classes) > 20 else "")
        rows.append(("classes", f"{len(classes)}: {shown}"))
    mname = meta.get("model") or model.get("name")
    if mname:
        rows.append(("model", f"{mname}" + (" (pretrained)" if model.get("pretrained") else "")))
    if meta:
        rows.append(("scores", f"norm {meta.get('norm')}, params {meta.get('params')}, split {meta.get('split')}, "
                               f"n {meta.get('n')}"))
    tr = (p or {}).get("train", {}) if isinstance(p, dict) else {}
    tr = tr if isinstance(tr, dict) else {}
    if tr:
        seeds = tr.get("seeds", tr.get("seed"))
        rows.append(("training", f"{tr.get('epochs')} epochs, batch {tr.get('batch_size')}, {tr.get('optimizer')} "
                                 f"lr {tr.get('lr')}, {tr.get('schedule')}, seed(s) {seeds}"))
    for stage in ("flag", "prune", "sweep"):
        body = (p or {}).get(stage) if isinstance(p, dict) else None
        if isinstance(body, dict) and body:
            rows.append((stage, ", ".join(f"{k} {v}" for k, v in body.items())))
    sec.add("<table class='kv'><tbody>" + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows)
            + "</tbody></table>")
    if p_err:
        sec.add(_note(f"params: {p_err}"))

    sec.add("<h3>Accuracy of each version (test split)</h3>")
    if metrics:
        trows = []
        for n, m in metrics.items():
            acc = m.get("accuracy")
            std = m.get("accuracy_std")
            runs = m.get("runs") or []
            trows.append((n, m.get("model", ""), acc, "–" if std is None else std, len(runs) or 1,
                          m.get("loss"), m.get("n"), m.get("n_train")))
        sec.add(_table(["version", "model", "accuracy", "± std", "seeds", "loss (nats)", "n test", "n train"],
                       trows, left=2))
        per = {n: m.get("per_class_accuracy") or {} for n, m in metrics.items()}
        names = list(classes) if classes else sorted({c for d in per.values() for c in d})
        if any(per.values()) and names:
            prow = [(c, *[per[n].get(c) for n in metrics]) for c in names]
            sec.add(f"<details><summary>per-class accuracy</summary>{_table(['class', *metrics], prow)}</details>")
    else:
        sec.add(_note("no metrics/*.json yet; run `clean evaluate` (dvc repro evaluate)"))

    if prune:
        le = prune.get("label_entropy") or {}
        sec.add("<h3>Pruned dataset</h3>")
        sec.add(_table(["n total", "n kept", "fraction", "label entropy kept", "all", "uniform"],
                       [(prune.get("n_total"), prune.get("n_kept"), prune.get("fraction_kept",
                         (prune.get("n_kept") or 0) / max(prune.get("n_total") or 1, 1)),
                         le.get("kept"), le.get("all"), le.get("uniform"))], left=0))
    else:
        sec.add(f"<p class='small'>no prune summary ({_e(prune_path)}) yet.</p>")
    if p:
        import yaml

        sec.add(f"<details><summary>params ({_e(params_path)})</summary><pre>"
                f"{_e(yaml.safe_dump(p, sort_keys=False))}</pre></details>")


def _card(r, names, img_uri: str | None, has_flags: bool) -> str:
    wrong = int(r["label"]) != int(r["pred"])
    img = (f"<img alt='id {_e(r['id'])}' src='{img_uri}'>" if img_uri else "<div class='noimg'>no image</div>")
    scores = " · ".join(f"{c.replace('self_influence', 'si').replace('grad_norm', 'gn')} {_num(r[c], 3)}"
                        for c in CARD_SCORES if c in r and r[c] == r[c])
    rule = ""
    if has_flags and r.get("flagged"):
        rule = f"<div class='rule'>{_e(r.get('rule', ''))} = {_num(r.get('flag_value'), 3)}</div>"
    noisy = ""
    if "noisy" in r and r["noisy"] == r["noisy"] and int(r["noisy"]):
        orig = f" (was {names(r['orig_label'])})" if "orig_label" in r else ""
        noisy = f"<div class='rule'>injected noise{_e(orig)}</div>"
    return (f"<figure class='card{' wrong' if wrong else ''}' data-id='{_e(r['id'])}'>{img}<figcaption>"
            f"<span class='id'>#{_e(r['id'])}</span> <span class='lp'>{_e(names(r['label']))}→{_e(names(r['pred']))}"
            f"</span><div>{_e(scores)}</div>{rule}{noisy}</figcaption></figure>")


def _flagged_section(sec: _Section, df, has_flags: bool, flags_path: Path, names, base: Path | None,
                     by: str, max_per_class: int, max_table_rows: int, log) -> dict:
    """Cards of the flagged samples per class (or the top by `by` when there are no flags)."""
    from pipeline.scores.order import top_order
    from pipeline.data.images import load_images

    if has_flags:
        cand = df[df["flagged"]]
        key = np.where(np.isnan(cand["flag_value"].to_numpy(np.float64)), cand[by].to_numpy(np.float64),
                       cand["flag_value"].to_numpy(np.float64))
        order_by, what = "flag value (highest first)", "flagged"
        sec.add(f"<p>{len(cand):,} of {len(df):,} training samples flagged "
                f"({len(cand) / max(len(df), 1):.2%}) by <code>{_e(', '.join(sorted(set(cand['rule'])))[:300])}</code>."
                f" Red: the model predicts another class than the label.</p>")
        cand = cand.iloc[top_order(key, "", cand["id"].to_numpy())]
    else:
        sec.add(_note(f"no flags file ({flags_path}); run `clean flag`. Showing the top {max_per_class} samples "
                      f"per class by {by} instead."))
        cand = df.iloc[top_order(df[by].to_numpy(np.float64), by, df["id"].to_numpy())]
        order_by, what = by, "top"
    if len(cand) == 0:
        sec.add("<p>No sample is flagged.</p>")
        return {"n_flagged": 0, "n_shown": 0, "ids": []}

    labels = cand["label"].to_numpy(np.int64)
    present = [c for c in np.unique(labels)]
    per = max(1, min(max_per_class, MAX_CARDS // max(len(present), 1)))
    shown = cand.groupby("label", sort=True, group_keys=False).head(per)
    # summary per class
    allc = df.groupby("label").size()
    flc = cand.groupby("label").size()
    extra = "noisy" in df.columns
    wrong = (df["label"] != df["pred"]).groupby(df["label"]).sum()
    noisy = df["noisy"].fillna(0).groupby(df["label"]).sum() if extra else None
    srows = []
    for c in sorted(set(allc.index)):
        n_c, f_c = int(allc.get(c, 0)), int(flc.get(c, 0))
        row = [names(c), n_c, f_c if has_flags else "–", f"{f_c / max(n_c, 1):.1%}" if has_flags else "–",
               int(wrong.get(c, 0))]
        if extra:
            row.append(int(noisy.get(c, 0)))
        srows.append(row)
    cols = ["class", "samples", "flagged", "% flagged", "label≠pred"] + (["injected noise"] if extra else [])
    sec.add(f"<details open><summary>per class</summary>{_table(cols, srows)}</details>")
    if extra and has_flags:
        nz = df["noisy"].fillna(0).astype(int).astype(bool).to_numpy()
        fl = df["flagged"].to_numpy(bool)
        tp = int((nz & fl).sum())
        sec.add(f"<p>Against the injected noise: precision {tp / max(fl.sum(), 1):.3f} "
                f"({tp} of {int(fl.sum())} flagged are noisy), recall {tp / max(nz.sum(), 1):.3f} "
                f"({tp} of {int(nz.sum())} noisy are flagged).</p>")

    # images
    uris: dict = {}
    img_note = None
    if base is None:
        img_note = "no manifest found to resolve image paths (pass --manifest); cards show no image"
    else:
        try:
            imgs = load_images(shown["path"].tolist(), base)
            used = 0
            for i, rid in enumerate(shown["id"].tolist()):
                b = thumbnail_png(imgs[i])
                if used + len(b) > THUMB_BUDGET:
                    img_note = f"thumbnail budget ({THUMB_BUDGET / 1e6:.0f} MB) reached; later cards show no image"
                    break
                used += len(b)
                uris[rid] = png_data_uri(b)
        except CleanError as e:
            img_note = f"images could not be read ({e}); cards show no image"
    if img_note:
        sec.add(_note(img_note))
    log(f"report: {len(shown)} sample cards, {len(uris)} thumbnails")

    recs = shown.to_dict("records")
    by_class: dict = {}
    for r in recs:
        by_class.setdefault(int(r["label"]), []).append(r)
    open_attr = " open" if len(by_class) <= 20 else ""
    for c, rs in sorted(by_class.items()):
        total = int(flc.get(c, 0))
        cards = "".join(_card(r, names, uris.get(r["id"]), has_flags) for r in rs)
        sec.add(f"<details{open_attr}><summary>{_e(names(c))}: showing {len(rs)} of {total:,} {what} "
                f"(by {_e(order_by)})</summary><div class='cards'>{cards}</div></details>")

    if has_flags:
        cols = ["id", "class", "pred", "rule", "value"] + [c for c in CARD_SCORES if c in cand.columns]
        if extra:
            cols.append("noisy")
        head = cand.head(max_table_rows)
        rows = [[r["id"], names(r["label"]), names(r["pred"]), r["rule"], r["flag_value"],
                 *[r[c] for c in CARD_SCORES if c in cand.columns], *([int(r["noisy"])] if extra else [])]
                for r in head.to_dict("records")]
        more = (f" (the first {len(head):,} of {len(cand):,}; the full list is {flags_path})"
                if len(cand) > len(head) else "")
        sec.add(f"<details><summary>all flagged samples{_e(more)}</summary>{_table(cols, rows, left=4)}</details>")
    return {"n_flagged": int(len(cand)) if has_flags else 0, "n_shown": int(len(shown)),
            "ids": [int(i) for i in shown["id"]]}


def _figure(sec: _Section, fn, *args, alt: str, **kw) -> bool:
    """Run a plots.* function writing a PNG (last positional arg); embed it or note the CleanError."""
    try:
        fn(*args, **kw)
    except CleanError as e:
        sec.missing(str(e))
        return False
    sec.add(_img_file(args[-1], alt))
    return True


# --------------------------------------------------------------------------- main


def build_report(out_dir: str | Path = "reports", manifest: str | Path = "data/manifest.csv",
                 scores_csv: str | Path = "scores/scores.csv", flags_csv: str | Path = "scores/flags.csv",
                 metrics_dir: str | Path = "metrics", plots_dir: str | Path = "plots",
                 sweep_summary: str | Path | None = None, dynamics: str | Path = "models/base/dynamics.npz",
                 params: str | Path = "params.yaml", prune_summary: str | Path = "prune/summary.json",
                 compare_scores: str | Path | None = None, max_per_class: int = 24, by: str = "loss",
                 k: int = 36, max_table_rows: int = 1000, progress=None) -> dict:
    """Write `out_dir`/index.html (all images embedded) + figures under `out_dir`/figures/.

    Every input but `scores_csv` is optional (its section then says what to run); a bad
    file that exists still raises CleanError naming it. max_per_class: flagged cards per
    class (also capped at 1500 cards and 12 MB of thumbnails in total). by: score used to
    order samples when there is no flags file, and for the top-k grid of `k` tiles.
    sweep_summary: None → sweep/summary.csv or plots/sweep.csv, whichever exists.
    compare_scores: a second scores.csv for the top-k overlap figure (else
    `plots_dir`/overlap.csv from `clean compare` is drawn if present).
    Returns {"path", "bytes", "seconds", "n_flagged", "n_shown", "shown_ids", "sections"}.
    """
    import pandas as pd

    from pipeline.views import plots
    from pipeline.formats.manifest import classes_path_for, read_classes, read_manifest
    from pipeline.formats.tables import join_flags, read_flags, read_scores
    from pipeline.views.grid import class_names, namer, resolve_manifest, top_grid
    from pipeline.io import write_text
    from pipeline.registry import SCORES

    SCORE_COLUMNS = SCORES.names()

    t0 = time.perf_counter()
    out_dir, figs = Path(out_dir), Path(out_dir) / "figures"
    manifest, scores_csv, flags_csv = Path(manifest), Path(scores_csv), Path(flags_csv)
    metrics_dir, plots_dir, params = Path(metrics_dir), Path(plots_dir), Path(params)
    if isinstance(max_per_class, bool) or not isinstance(max_per_class, int) or max_per_class < 1:
        raise CleanError(f"max_per_class must be a positive integer, got {max_per_class!r}")

    def log(msg: str) -> None:
        if progress:
            progress("log", message=msg)

    p, p_err = _load_params(params)
    # the manifest the scores came from resolves the image paths
    meta_path = scores_csv.parent / "meta.json"
    meta = _read_json(meta_path) if meta_path.exists() else {}
    img_manifest = resolve_manifest(scores_csv, None)
    if img_manifest is None and manifest.exists():
        img_manifest = manifest
    head_manifest = manifest if manifest.exists() else img_manifest
    mdf = read_manifest(head_manifest) if head_manifest is not None else None
    classes = class_names(head_manifest) if head_manifest is not None else None
    if classes is None and classes_path_for(manifest).exists():
        classes = read_classes(classes_path_for(manifest))["classes"]
    names = namer(classes)
    metrics = _metrics(metrics_dir)
    prune_path = Path(prune_summary)
    prune = _read_json(prune_path) if prune_path.exists() else None

    sections: list[_Section] = []
    head = _Section("summary", "Summary")
    _header(head, p, p_err, params, head_manifest, mdf, classes, meta, metrics, prune, prune_path)
    sections.append(head)
    log("report: header")

    # scores (+ flags)
    flagged_sec = _Section("flagged", "Flagged samples per class")
    top_sec = _Section("top", f"Top {k} by {by}")
    dist_sec = _Section("scores", "Score distributions")
    ent_sec = _Section("entropy", "Label entropy of the top-k samples (figure 2)")
    sections += [flagged_sec, top_sec, dist_sec]
    info = {"n_flagged": 0, "n_shown": 0, "ids": []}
    df = None
    if not scores_csv.exists():
        for s in (flagged_sec, top_sec, dist_sec, ent_sec):
            s.missing(f"no scores file ({scores_csv}); run `clean score` (dvc repro score)")
    else:
        df = read_scores(scores_csv, ["path", "pred"])
        for c in SCORE_COLUMNS + ["label", "pred"]:
            if c in df.columns:
                df[c] = pd.to_numeric(df[c], errors="coerce")
        if by not in df.columns or df[by].isna().all():
            raise CleanError(f"{scores_csv}: no values in score column '{by}'; pick another (--by), one of "
                             f"{', '.join(c for c in SCORE_COLUMNS if c in df.columns)}")
        has_flags = flags_csv.exists()
        if has_flags:
            df = join_flags(df, read_flags(flags_csv), flags_csv)
        else:
            df["flagged"], df["rule"], df["flag_value"] = False, "", np.nan
        base = img_manifest.parent if img_manifest is not None else None
        info = _flagged_section(flagged_sec, df, has_flags, flags_csv, names, base, by,
                                max_per_class, max_table_rows, log)
        # top-k grid (the same picture as `clean show`)
        if base is not None:
            try:
                shown = top_grid(scores_csv, by=by, k=k, path=figs / f"top_{by}.png",
                                 flags_csv=flags_csv if has_flags else None, classes=classes, manifest=img_manifest)
                top_sec.add(_img_file(figs / f"top_{by}.png", f"top {k} by {by}"))
                top_sec.add(f"<p class='small'>ids, in order: {_e(', '.join(map(str, shown['id'].tolist())))}</p>")
            except CleanError as e:
                top_sec.missing(str(e))
        else:
            top_sec.missing("no manifest found to resolve image paths; pass --manifest")
        log("report: flagged samples and top-k grid")
        # distributions
        cols = [c for c in SCORE_COLUMNS if c in df.columns and df[c].notna().any()]
        qs = df[cols].quantile([0.0, 0.25, 0.5, 0.75, 0.95, 1.0])
        dist_sec.add(_table(["score", "min", "q25", "median", "q75", "q95", "max", "flagged median"],
                            [(c, *[qs.loc[q, c] for q in qs.index],
                              df.loc[df["flagged"], c].median() if df["flagged"].any() else None) for c in cols]))
        plots.score_hist_png(df, cols, figs / "score_hist.png", flagged=df["flagged"].to_numpy() if has_flags else None)
        dist_sec.add(_img_file(figs / "score_hist.png", "score histograms"))
        # figure 2
        bys = [b for b in ("grad_norm", "loss", "el2n", "forgetting", "self_influence") if b in cols]
        _figure(ent_sec, plots.entropy_topk, scores_csv, bys, len(classes) if classes else None,
                figs / "entropy_topk.csv", figs / "entropy_topk.png", alt="label entropy of the top-k")
        log("report: score distributions, entropy")

    # figure 1
    heat = _Section("heatmap", "Per-sample gradient magnitude over training (figure 1)")
    _figure(heat, plots.grad_heatmap, dynamics, figs / "grad_heatmap.csv", figs / "grad_heatmap.png",
            alt="gradient heatmap")
    # figure 3
    sweep = _Section("sweep", "Accuracy vs keep fraction (figure 3)")
    sweep_summary = plots.find_sweep_summary(sweep_summary)
    if sweep_summary.exists():
        _figure(sweep, plots.sweep_plot, sweep_summary, figs / "sweep.csv", figs / "sweep.png", alt="sweep")
    else:
        sweep.missing(f"no sweep yet ({sweep_summary}); run the sweep stage (dvc repro sweep)")
    # figure 4
    ov = _Section("overlap", "Top-k overlap of two score files (figure 4)")
    if compare_scores is not None and df is not None:
        _figure(ov, plots.overlap_topk, scores_csv, compare_scores, "grad_norm", figs / "overlap.csv",
                figs / "overlap.png", alt="top-k overlap")
    elif (plots_dir / "overlap.png").exists():
        ov.add(_img_file(plots_dir / "overlap.png", "top-k overlap"))
        ov.add(f"<p class='small'>from {_e(plots_dir / 'overlap.png')} (written by `clean compare`).</p>")
    else:
        ov.missing("no second score file; run `clean compare scores_a.csv scores_b.csv` "
                   f"(writes {plots_dir / 'overlap.png'}) or pass --compare")
    # figure 5
    conf = _Section("confusion", "Confusion matrices (figure 5)")
    cfiles = sorted(plots_dir.glob("confusion_*.csv")) if plots_dir.is_dir() else []
    if cfiles:
        conf.add("<div class='figs'>")
        for cf in cfiles:
            name = cf.stem[len("confusion_"):]
            _figure(conf, plots.confusion_png, cf, figs / f"{cf.stem}.png", alt=f"confusion {name}",
                    classes=classes, title=name)
        conf.add("</div>")
    else:
        conf.missing(f"no confusion data ({plots_dir}/confusion_*.csv); run `clean evaluate`")
    sections += [heat, ent_sec, sweep, ov, conf]
    log("report: figures")

    title = f"clean report — {(p or {}).get('data', {}).get('source', '') if isinstance(p, dict) else ''}".rstrip(" —")
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    nav = "".join(f"<a href='#{s.key}'>{_e(s.title.split(' (')[0])}</a>" for s in sections)
    acc = " · ".join(f"{n} {m.get('accuracy', float('nan')):.4f}" for n, m in metrics.items())
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{_CSS}</style></head><body>"
            f"<header><h1>{_e(title)}</h1><div class='sub'>generated {when} · "
            f"{_e(len(df) if df is not None else 0)} scored samples · {_e(info['n_flagged'])} flagged"
            f"{' · accuracy ' + _e(acc) if acc else ''}</div></header><nav>{nav}</nav><main>"
            + "".join(s.html() for s in sections) + "</main></body></html>\n")
    out = out_dir / "index.html"
    write_text(out, page)
    return {"path": str(out), "bytes": len(page.encode("utf-8")), "seconds": round(time.perf_counter() - t0, 3),
            "n_flagged": info["n_flagged"], "n_shown": info["n_shown"], "shown_ids": info["ids"],
            "sections": {s.key: s.status for s in sections}}
