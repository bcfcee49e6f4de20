"""`clean report`'s page: one self-contained HTML file that shows every result.

Sections: header (dataset, model, params, accuracy of each evaluated version, prune summary),
flagged samples per class (thumbnails with id, label→pred, rule and scores), the top-k grid,
score distributions, and the paper's figures (gradient heatmap, entropy of the top-k,
accuracy vs keep fraction, top-k overlap of two score files, confusion matrices; which
finding each one checks: docs/methods.md §6.1).

This module renders: one function per section, each taking what it shows (data frames,
dicts, paths) as arguments; pipeline/stages/report.py reads the input files and writes the
page. Every image is embedded as a base64 PNG data: URI, so the page opens from disk with no
server and can be copied anywhere; the figure PNGs (and their CSV data) are also kept under
the report's figures/ folder. A missing optional input turns its section into a note saying
what to run. At 60k samples the page stays small: thumbnails are capped per class and in total
bytes, the flagged table is capped.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
from pathlib import Path

import numpy as np

from pipeline.data.images import load_images
from pipeline.errors import CleanError
from pipeline.scores.order import top_order
from pipeline.verdict import sentence
from pipeline.views import plots
from pipeline.views.grid import to_pil, top_grid
from pipeline.views.why import facts_line, why

#: Thumbnails larger than this (longer side, px) are shrunk; smaller ones are scaled by CSS.
THUMB_PX = 96
#: Embedded thumbnails stop (text-only cards) once they take this many bytes.
THUMB_BUDGET = 12_000_000
#: At most this many cards over all classes.
MAX_CARDS = 1500
#: Score columns shown on each card (and in the flagged table) when present: a display choice,
#: not a list of the scores (that is pipeline.registry.SCORES).
CARD_SCORES = ("loss", "grad_norm", "margin", "self_influence", "importance")
#: The lines of figure 2, when present (the first fills the `entropy` column): the paper's choice.
ENTROPY_SCORES = ("grad_norm", "loss", "el2n", "forgetting", "self_influence")

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
.group{display:flex;gap:4px;align-items:flex-start;border:1px dashed #bbb;border-radius:5px;padding:4px;margin:4px 6px 4px 0}
.groups{display:flex;flex-wrap:wrap}.card.leak{border-color:#c81e1e}.card .sug{color:#0a6b2e;font-weight:bold}
.verdict{font-weight:600;margin:6px 0}.verdict.good{color:#0a6b2e}.verdict.bad{color:#c81e1e}.verdict.same{color:#555}
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

    im = to_pil(img_u8)
    if max(im.size) > THUMB_PX:
        im.thumbnail((THUMB_PX, THUMB_PX), Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


class Section:
    """Collects one section's HTML; missing(why) turns it into a note saying what to run."""

    def __init__(self, key: str, title: str):
        self.key, self.title, self.parts, self.status = key, title, [], "ok"

    def add(self, s: str) -> None:
        self.parts.append(s)

    def missing(self, why: str) -> None:
        self.status = f"missing: {why}"
        self.add(_note(why))

    def html(self) -> str:
        return f"<section id='{self.key}'><h2>{_e(self.title)}</h2>{''.join(self.parts)}</section>"


#: Section key → title (the top-k title is formatted with k and by), in page order.
TITLES = {
    "summary": "Summary",
    "flagged": "Flagged samples per class",
    "issues": "Issues by type (label, duplicates and leakage, outliers, image defects)",
    "top": "Top {k} by {by}",
    "importance": "Importance: what removing each image is predicted to do",
    "scores": "Score distributions",
    "heatmap": "Per-sample gradient magnitude over training (figure 1)",
    "entropy": "Label entropy of the top-k samples (figure 2)",
    "sweep": "Accuracy vs keep fraction (figure 3)",
    "overlap": "Top-k overlap of two score files (figure 4)",
    "confusion": "Confusion matrices (figure 5)",
}


def section(key: str, **fmt) -> Section:
    """A new, empty section `key` with its title from TITLES."""
    return Section(key, TITLES[key].format(**fmt))


def _figure(sec: Section, fn, *args, alt: str, **kw) -> bool:
    """Run a plots.* function writing a PNG (last positional arg); embed it or note the CleanError."""
    try:
        fn(*args, **kw)
    except CleanError as e:
        sec.missing(str(e))
        return False
    sec.add(_img_file(args[-1], alt))
    return True


# --------------------------------------------------------------------------- summary


def _part(p, key: str) -> dict:
    """params section `key` as a dict ({} when params are missing or the section is not a mapping)."""
    body = p.get(key, {}) if isinstance(p, dict) else {}
    return body if isinstance(body, dict) else {}


def _dataset_rows(mdf, classes) -> list:
    """Header rows from the manifest: samples per split, injected noise, class names."""
    rows = []
    if mdf is not None:
        counts = mdf["split"].value_counts()
        rows.append(("samples", ", ".join(f"{s}: {int(counts.get(s, 0)):,}" for s in ("train", "val", "test"))))
        if "noisy" in mdf.columns and int(mdf["noisy"].sum()):
            per = mdf.groupby("split")["noisy"].sum()
            rows.append(("injected label noise", ", ".join(f"{s}: {int(per.get(s, 0)):,}" for s in ("train", "val", "test")
                                                           if int(per.get(s, 0))) + " labels changed"))
    if classes:
        shown = ", ".join(classes[:20]) + (f", … ({len(classes)} in all)" if len(classes) > 20 else "")
        rows.append(("classes", f"{len(classes)}: {shown}"))
    return rows


def _run_rows(p, manifest, mdf, classes, meta: dict) -> list:
    """Header rows: dataset, manifest, samples, classes, model, scoring, training, stage params."""
    data, model, tr = _part(p, "data"), _part(p, "model"), _part(p, "train")
    rows = []
    if data:
        rows.append(("dataset", f"{data.get('source')}" + (f" ({data.get('root')})" if data.get("root") else "")))
    if manifest is not None:
        rows.append(("manifest", str(manifest)))
    rows += _dataset_rows(mdf, classes)
    mname = meta.get("model") or model.get("name")
    if mname:
        rows.append(("model", f"{mname}" + (" (pretrained)" if model.get("pretrained") else "")))
    if meta:
        rows.append(("scores", f"norm {meta.get('norm')}, params {meta.get('params')}, split {meta.get('split')}, "
                               f"n {meta.get('n')}"))
    if tr:
        seeds = tr.get("seeds", tr.get("seed"))
        rows.append(("training", f"{tr.get('epochs')} epochs, batch {tr.get('batch_size')}, {tr.get('optimizer')} "
                                 f"lr {tr.get('lr')}, {tr.get('schedule')}, seed(s) {seeds}"))
    for stage in ("flag", "prune", "sweep"):
        body = _part(p, stage)
        if body:
            rows.append((stage, ", ".join(f"{k} {v}" for k, v in body.items())))
    return rows


def _accuracy(metrics: dict, classes) -> str:
    """Accuracy of each evaluated version, and per class (or a note saying what to run)."""
    if not metrics:
        return _note("no metrics/*.json yet; run `clean evaluate` (dvc repro evaluate)")
    trows = []
    for n, m in metrics.items():
        std = m.get("accuracy_std")
        trows.append((n, m.get("model", ""), m.get("accuracy"), "–" if std is None else std,
                      len(m.get("runs") or []) or 1, m.get("loss"), m.get("n"), m.get("n_train"), _aside(m)))
    out = _table(["version", "model", "accuracy", "± std", "seeds", "loss (nats)", "n test", "n train",
                  "test label decisions applied"], trows, left=2)

    from pipeline.effect import line

    for n, m in metrics.items():
        if "verdict" in m and "baseline" in m:
            cls = "good" if m["verdict"] == "better" else ("bad" if m["verdict"] == "worse" else "same")
            out += f"<p class='verdict {cls}'>{_e(sentence(n, m['baseline'], m))}</p>"
        if "dval_loss" in m and "dval_loss_pred" in m:
            out += f"<p class='verdict same'>{_e(line(n, m))}</p>"
    per = {n: m.get("per_class_accuracy") or {} for n, m in metrics.items()}
    names = list(classes) if classes else sorted({c for d in per.values() for c in d})
    if any(per.values()) and names:
        prow = [(c, *[per[n].get(c) for n in metrics]) for c in names]
        out += f"<details><summary>per-class accuracy</summary>{_table(['class', *metrics], prow)}</details>"
    return out


def _aside(m: dict) -> str:
    """The accuracy with the test split's label decisions applied (docs/methods.md §5.3), named."""
    for key, what in (("accuracy_reviewed", "reviewed labels"), ("accuracy_unflagged", "flagged left out")):
        if key in m:
            leaked = f", {m['n_leaked']} of them copies of training images" if m.get("n_leaked") else ""
            return f"{m[key]:.4f} ({what}; {m.get('n_set_aside', 0)} set aside{leaked})"
    return "–"


def _pruned(prune: dict | None, prune_path: Path) -> str:
    """The prune summary: kept count and fraction, label entropy kept / all / uniform."""
    if not prune:
        return f"<p class='small'>no prune summary ({_e(prune_path)}) yet.</p>"
    le = prune.get("label_entropy") or {}
    frac = prune.get("fraction_kept", (prune.get("n_kept") or 0) / max(prune.get("n_total") or 1, 1))
    eff = prune.get("effect") or {}
    pred = (f"{eff['predicted_dval_loss']:+.4f} ± {eff['predicted_dval_loss_sd']:.4f}"
            if "predicted_dval_loss" in eff else "–")
    gate = prune.get("label_gate")
    how = (f"<p class='small'>{_e(prune.get('strategy') or '')}: {gate['dropped']} of {gate['label_issues']} label "
           f"issues dropped, {gate['kept']} kept ({_e(gate['rule'])}).</p>" if gate else "")
    return "<h3>Pruned dataset</h3>" + how + _table(
        ["n total", "n kept", "fraction", "label entropy kept", "all", "uniform", "predicted Δ val loss (nats)"],
        [(prune.get("n_total"), prune.get("n_kept"), frac, le.get("kept"), le.get("all"), le.get("uniform"), pred)],
        left=0)


def summary_section(p, p_err: str | None, params_path: Path, manifest, mdf, classes, meta: dict, metrics: dict,
                    prune: dict | None, prune_path: Path) -> Section:
    """Header: dataset, model, params, accuracy of each evaluated version, prune summary."""
    sec = section("summary")
    sec.add("<table class='kv'><tbody>" + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>"
                                                  for k, v in _run_rows(p, manifest, mdf, classes, meta))
            + "</tbody></table>")
    if p_err:
        sec.add(_note(f"params: {p_err}"))
    sec.add("<h3>Accuracy of each version (test split)</h3>")
    sec.add(_accuracy(metrics, classes))
    sec.add(_pruned(prune, prune_path))
    if p:
        import yaml

        sec.add(f"<details><summary>params ({_e(params_path)})</summary><pre>"
                f"{_e(yaml.safe_dump(p, sort_keys=False))}</pre></details>")
    return sec


# --------------------------------------------------------------------------- flagged samples


def _short(score: str) -> str:
    """Card label of a score column: the initials of a compound name (grad_norm → gn)."""
    return "".join(w[0] for w in score.split("_")) if "_" in score else score


def _card(r, names, img_uri: str | None, has_flags: bool) -> str:
    wrong = int(r["label"]) != int(r["pred"])
    img = (f"<img alt='id {_e(r['id'])}' src='{img_uri}'>" if img_uri else "<div class='noimg'>no image</div>")
    scores = " · ".join(f"{_short(c)} {_num(r[c], 3)}" for c in CARD_SCORES if c in r and r[c] == r[c])
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


def _candidates(sec: Section, df, has_flags: bool, flags_path: Path, by: str, max_per_class: int):
    """The samples to show, most suspicious first: the flagged ones by flag value, else all by `by`
    → (rows, what they are ordered by, what they are)."""

    if not has_flags:
        sec.add(_note(f"no flags file ({flags_path}); run `clean flag`. Showing the top {max_per_class} samples "
                      f"per class by {by} instead."))
        return df.iloc[top_order(df[by].to_numpy(np.float64), by, df["id"].to_numpy())], by, "top"
    cand = df[df["flagged"]]
    value = cand["flag_value"].to_numpy(np.float64)
    key = np.where(np.isnan(value), cand[by].to_numpy(np.float64), value)
    rules = sorted(set(df["rule"].dropna().astype(str)) - {""})  # every row carries the rule, flagged or not
    rule = f"<code>{_e(', '.join(rules)[:300])}</code>" if rules else "the flag rule"
    sec.add(f"<p>{len(cand):,} of {len(df):,} training samples flagged "
            f"({len(cand) / max(len(df), 1):.2%}) by {rule}."
            f" Red: the model predicts another class than the label.</p>")
    return cand.iloc[top_order(key, "", cand["id"].to_numpy())], "flag value (highest first)", "flagged"


def _class_summary(df, flc, has_flags: bool, names) -> str:
    """Per class: samples, flagged, % flagged, label ≠ prediction, injected noise."""
    allc = df.groupby("label").size()
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
    return f"<details open><summary>per class</summary>{_table(cols, srows)}</details>"


def _noise_recall(df) -> str:
    """Precision and recall of the flags against the injected noise."""
    nz = df["noisy"].fillna(0).astype(int).astype(bool).to_numpy()
    fl = df["flagged"].to_numpy(bool)
    tp = int((nz & fl).sum())
    return (f"<p>Against the injected noise: precision {tp / max(fl.sum(), 1):.3f} "
            f"({tp} of {int(fl.sum())} flagged are noisy), recall {tp / max(nz.sum(), 1):.3f} "
            f"({tp} of {int(nz.sum())} noisy are flagged).</p>")


def _thumbnails(sec: Section, shown, base: Path | None) -> dict:
    """id → thumbnail data: URI for the rows `shown`, within THUMB_BUDGET (a note says what is left out)."""

    uris: dict = {}
    img_note = None
    if base is None:
        img_note = "no manifest found to resolve image paths (pass --manifest); cards show no image"
    else:
        try:
            shown = shown[[isinstance(p, str) and p != "" for p in shown["path"]]]  # no image for unknown ids
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
    return uris


def _class_cards(shown, flc, names, uris: dict, has_flags: bool, what: str, order_by: str) -> str:
    """One folding block of sample cards per class."""
    by_class: dict = {}
    for r in shown.to_dict("records"):
        by_class.setdefault(int(r["label"]), []).append(r)
    open_attr = " open" if len(by_class) <= 20 else ""
    out = []
    for c, rs in sorted(by_class.items()):
        cards = "".join(_card(r, names, uris.get(r["id"]), has_flags) for r in rs)
        out.append(f"<details{open_attr}><summary>{_e(names(c))}: showing {len(rs)} of {int(flc.get(c, 0)):,} "
                   f"{what} (by {_e(order_by)})</summary><div class='cards'>{cards}</div></details>")
    return "".join(out)


def _flag_table(cand, names, flags_path: Path, max_rows: int) -> str:
    """The table of all flagged samples (the first `max_rows`)."""
    extra = "noisy" in cand.columns
    shown_scores = [c for c in CARD_SCORES if c in cand.columns]
    cols = ["id", "class", "pred", "rule", "value"] + shown_scores + (["noisy"] if extra else [])
    head = cand.head(max_rows)
    rows = [[r["id"], names(r["label"]), names(r["pred"]), r["rule"], r["flag_value"],
             *[r[c] for c in shown_scores], *([int(r["noisy"])] if extra else [])]
            for r in head.to_dict("records")]
    more = (f" (the first {len(head):,} of {len(cand):,}; the full list is {flags_path})"
            if len(cand) > len(head) else "")
    return f"<details><summary>all flagged samples{_e(more)}</summary>{_table(cols, rows, left=4)}</details>"


def flagged_section(df, has_flags: bool, flags_path: Path, names, base: Path | None, by: str,
                    max_per_class: int, max_table_rows: int, log) -> tuple[Section, dict]:
    """Cards of the flagged samples per class (or the top by `by` when there are no flags)
    → (section, {"n_flagged", "n_shown", "ids"})."""
    sec = section("flagged")
    cand, order_by, what = _candidates(sec, df, has_flags, flags_path, by, max_per_class)
    if len(cand) == 0:
        sec.add("<p>No sample is flagged.</p>")
        return sec, {"n_flagged": 0, "n_shown": 0, "ids": []}
    present = np.unique(cand["label"].to_numpy(np.int64))
    per = max(1, min(max_per_class, MAX_CARDS // max(len(present), 1)))
    shown = cand.groupby("label", sort=True, group_keys=False).head(per)
    flc = cand.groupby("label").size()
    sec.add(_class_summary(df, flc, has_flags, names))
    if "noisy" in df.columns and has_flags:
        sec.add(_noise_recall(df))
    uris = _thumbnails(sec, shown, base)
    log(f"report: {len(shown)} sample cards, {len(uris)} thumbnails")
    sec.add(_class_cards(shown, flc, names, uris, has_flags, what, order_by))
    if has_flags:
        sec.add(_flag_table(cand, names, flags_path, max_table_rows))
    return sec, {"n_flagged": int(len(cand)) if has_flags else 0, "n_shown": int(len(shown)),
                 "ids": [int(i) for i in shown["id"]]}


# --------------------------------------------------------------------------- scores and figures


def top_section(scores_csv: Path, by: str, k: int, figs: Path, flags_csv: Path | None, classes,
                manifest: Path | None) -> Section:
    """The top-k grid (the same picture as `clean show`); `manifest` resolves the image paths."""

    sec = section("top", k=k, by=by)
    if manifest is None:
        sec.missing("no manifest found to resolve image paths; pass --manifest")
        return sec
    try:
        shown = top_grid(scores_csv, by=by, k=k, path=figs / f"top_{by}.png", flags_csv=flags_csv, classes=classes,
                         manifest=manifest)
        sec.add(_img_file(figs / f"top_{by}.png", f"top {k} by {by}"))
        sec.add(f"<p class='small'>ids, in order: {_e(', '.join(map(str, shown['id'].tolist())))}</p>")
    except CleanError as e:
        sec.missing(str(e))
    return sec


def importance_section(df, names, k: int = 20) -> Section:
    """The k most important and the k most harmful training images by `importance` (nats: the
    predicted rise of the mean validation loss if the image is removed; docs/methods.md §1.6)."""
    sec = section("importance")
    if "importance" not in df.columns or not df["importance"].notna().any():
        sec.missing("no importance values; run `clean score` with score.importance: true (needs a val split)")
        return sec
    sec.add(_note("importance = the predicted change of the mean validation loss, in nats, if the image is removed "
                  "(TRAK over the trained seeds' models, calibrated): > 0 it helps the model, < 0 it hurts. "
                  "`clean show --by importance` shows the images, lowest (most harmful) first; "
                  "`harmful` marks those whose harm every seed's model agrees on and exceeds "
                  "99 % of the helpful images' predicted help (rules/influence.py NULL_QUANTILE)."))
    d = df[df["importance"].notna()]
    harm = d["is_harmful"].astype(bool) if "is_harmful" in d.columns else None
    for title, part in (("most important", d.nlargest(k, "importance")),
                        ("most harmful", d.nsmallest(k, "importance"))):
        rows = [(int(r["id"]), names(r["label"]), names(r["pred"]), r["importance"],
                 ("yes" if harm[i] else "") if harm is not None else "–") for i, r in part.iterrows()]
        sec.add(f"<h3>{title}</h3>" + _table(["id", "label", "predicted", "importance (nats)", "harmful"], rows,
                                              left=3))
    return sec


def scores_section(df, cols: list[str], has_flags: bool, figs: Path) -> Section:
    """Quantiles of each score column `cols` (and the flagged median), and their histograms."""

    sec = section("scores")
    qs = df[cols].quantile([0.0, 0.25, 0.5, 0.75, 0.95, 1.0])
    sec.add(_table(["score", "min", "q25", "median", "q75", "q95", "max", "flagged median"],
                   [(c, *[qs.loc[q, c] for q in qs.index],
                     df.loc[df["flagged"], c].median() if df["flagged"].any() else None) for c in cols]))
    plots.score_hist_png(df, cols, figs / "score_hist.png", flagged=df["flagged"].to_numpy() if has_flags else None)
    sec.add(_img_file(figs / "score_hist.png", "score histograms"))
    return sec


def entropy_section(scores_csv: Path, cols: list[str], classes, figs: Path) -> Section:
    """Figure 2 for the ENTROPY_SCORES among the score columns `cols`."""

    sec = section("entropy")
    bys = [b for b in ENTROPY_SCORES if b in cols]
    _figure(sec, plots.entropy_topk, scores_csv, bys, len(classes) if classes else None,
            figs / "entropy_topk.csv", figs / "entropy_topk.png", alt="label entropy of the top-k")
    return sec


def heatmap_section(dynamics: Path, figs: Path) -> Section:
    """Figure 1 from a dynamics.npz."""

    sec = section("heatmap")
    _figure(sec, plots.grad_heatmap, dynamics, figs / "grad_heatmap.csv", figs / "grad_heatmap.png",
            alt="gradient heatmap")
    return sec


def sweep_section(summary: Path | None, figs: Path) -> Section:
    """Figure 3 from a sweep summary (None: none given)."""

    sec = section("sweep")
    if summary is not None and summary.exists():
        _figure(sec, plots.sweep_plot, summary, figs / "sweep.csv", figs / "sweep.png", alt="sweep")
    else:
        sec.missing(f"no sweep yet ({summary or 'no summary given'}); run the sweep stage (dvc repro sweep)")
    return sec


def overlap_section(scores_csv: Path, compare_scores: Path | None, have_scores: bool, plots_dir: Path,
                    figs: Path) -> Section:
    """Figure 4: drawn from a second score file, else the one `clean compare` left in `plots_dir`."""

    sec = section("overlap")
    if compare_scores is not None and have_scores:
        _figure(sec, plots.overlap_topk, scores_csv, compare_scores, "grad_norm", figs / "overlap.csv",
                figs / "overlap.png", alt="top-k overlap")
    elif (plots_dir / "overlap.png").exists():
        sec.add(_img_file(plots_dir / "overlap.png", "top-k overlap"))
        sec.add(f"<p class='small'>from {_e(plots_dir / 'overlap.png')} (written by `clean compare`).</p>")
    else:
        sec.missing("no second score file; run `clean compare scores_a.csv scores_b.csv` "
                    f"(writes {plots_dir / 'overlap.png'}) or pass --compare")
    return sec


def confusion_section(plots_dir: Path, classes, figs: Path) -> Section:
    """Figure 5 for every confusion_<version>.csv in `plots_dir`."""

    sec = section("confusion")
    cfiles = sorted(plots_dir.glob("confusion_*.csv")) if plots_dir.is_dir() else []
    if not cfiles:
        sec.missing(f"no confusion data ({plots_dir}/confusion_*.csv); run `clean evaluate`")
        return sec
    sec.add("<div class='figs'>")
    for cf in cfiles:
        name = cf.stem[len("confusion_"):]
        _figure(sec, plots.confusion_png, cf, figs / f"{cf.stem}.png", alt=f"confusion {name}",
                classes=classes, title=name)
    sec.add("</div>")
    return sec


# --------------------------------------------------------------------------- page


def _issue_card(r, names, uri: str | None, kind: str, facts: dict | None = None) -> str:
    """One card of the issue sections: image, id, label (→ suggested label for label issues), score,
    and why it was flagged (pipeline/views/why.py: the statistic, the cut, the neighbour)."""
    img = f"<img alt='id {_e(r['id'])}' src='{uri}'>" if uri else "<div class='noimg'>no image</div>"
    lab = _e(names(r["label"]))
    if kind == "label" and "suggested_label" in r and r["suggested_label"] == r["suggested_label"]:
        lab += f" → <span class='sug'>{_e(names(int(r['suggested_label'])))}</span>"
    split = f" · {_e(r['split'])}" if r.get("split", "train") != "train" else ""
    score = r.get(f"{kind}_score")
    return (f"<figure class='card{' leak' if split else ''}' data-sample='{_e(r['id'])}' data-issue='{_e(kind)}'>"
            f"{img}<figcaption><span class='id' title='decide on it: clean review --at {_e(r['id'])}'>#{_e(r['id'])}</span>"
            f"{split} <span class='lp'>{lab}</span>"
            f"<div>{_e(kind)} {_num(score, 3) if score is not None else ''}</div>"
            f"<div class='small'>{_e(why(r, kind, facts))}</div></figcaption></figure>")


def issues_section(flags, issues: dict, rows, names, base: Path | None, per_type: int = 24) -> Section:
    """One part per issue type of flags.csv: count, the detector's facts (issues.json), and cards
    of the most severe samples; duplicates as groups side by side (members of every split)."""
    sec = section("issues")
    if flags is None:
        sec.missing("no flags file; run `clean flag`")
        return sec
    types = [c[3:] for c in flags.columns if c.startswith("is_")]
    if not types:  # a flags.csv of the rule alone (older `clean flag`): its flags as the one type
        sec.add(_note("this flags file has only the rule's flags (no is_<type> columns); re-run `clean flag` "
                      "for every issue type"))
        flags = flags.assign(is_flagged=flags["flagged"], flagged_score=flags["value"])
        types = ["flagged"]
    sec.add(_table(["issue", "images", "rule / facts"],
                   [(t, int(flags[f"is_{t}"].sum()), "; ".join(
                       x for x in (str(issues.get(t, {}).get("rule", "")), facts_line(issues.get(t, {}))) if x))
                    for t in types]))
    if "split" in flags.columns and "is_label" in flags.columns:
        per = flags[flags["is_label"].astype(bool)]["split"].value_counts()
        sec.add(_note("label issues per split: " + ", ".join(f"{sp} {int(per.get(sp, 0))}" for sp in
                                                              ("train", "val", "test")) +
                      " (val/test: the base models' out-of-sample predictions, docs/methods.md §2.3; a reviewed "
                      "test label counts in accuracy_reviewed, never in training)"))
    sec.add("<p class='small'>Decide on these (keep / drop / relabel) in the browser: <code>clean review</code>; "
            "a card's sample opens there with <code>clean review --at &lt;id&gt;</code> (the id on the card; the page "
            "address is then <code>…/#id=&lt;id&gt;</code>). <code>clean prune</code> / <code>dvc repro</code> "
            "applies the decisions (data/decisions.csv).</p>")
    skipped = {t: d["skipped"] for t, d in issues.items() if "skipped" in d}
    if skipped:
        sec.add(_note("not checked: " + "; ".join(f"{t} ({why})" for t, why in skipped.items())))
    for t in types:
        hit = flags[flags[f"is_{t}"].astype(bool)]
        if not len(hit):
            continue
        sec.add(f"<h3 id='issue-{_e(t)}'>{_e(t)} — {len(hit)} image(s)</h3>")
        if t == "duplicate" and "duplicate_group" in flags.columns:
            sec.add(_groups(sec, flags, rows, names, base, per_type, issues.get("duplicate")))
            continue
        top = hit.sort_values([f"{t}_score", "id"], ascending=[False, True]).head(per_type)
        shown = rows.loc[rows["id"].isin(top["id"])].merge(top, on=["id"], how="right", suffixes=("", "_f"))
        uris = _thumbnails(sec, shown, base)
        sec.add("<div class='cards'>" + "".join(_issue_card(r, names, uris.get(r["id"]), t, issues.get(t))
                                                 for r in shown.to_dict("records")) + "</div>")
        if len(hit) > per_type:
            sec.add(_note(f"{len(hit) - per_type} more in flags.csv (is_{t} = 1)"))
    return sec


def _groups(sec: Section, flags, rows, names, base: Path | None, max_groups: int, facts: dict | None = None) -> str:
    """Duplicate groups side by side: every member the manifest has (train and val/test)."""
    import pandas as pd

    g = flags[flags["duplicate_group"] >= 0]
    order = (g.groupby("duplicate_group")["duplicate_score"].max().sort_values(ascending=False).index[:max_groups])
    members = rows[rows["duplicate_group"].isin(order)] if "duplicate_group" in rows.columns else \
        rows.merge(g[["id", "duplicate_group"]], on="id")
    # the val/test members: flags.csv has no row for them, issues.json names them
    from pipeline.views.sets import eval_members

    shown, have = set(order), set(members["id"])
    ev = [(i, gid) for gid, evs in eval_members(facts, dict(zip(g["id"], g["duplicate_group"].astype(int)))).items()
          if gid in shown for i in evs if i not in have]
    if ev:
        ev = rows.merge(pd.DataFrame(ev, columns=["id", "duplicate_group"]), on="id")
        members = pd.concat([members, ev], ignore_index=True)
    extra = [c for c in ("duplicate_score", "duplicate_of", "duplicate_conflict", "duplicate_cut") if c in flags.columns]
    members = members.merge(flags[["id", *extra]], on="id", how="left")
    uris = _thumbnails(sec, members, base)
    out = []
    for gid in order:
        m = members[members["duplicate_group"] == gid]
        labels = {int(x) for x in m["label"]}
        tag = " · label conflict" if len(labels) > 1 else ""
        tag += " · leakage" if (m.get("split", "train") != "train").any() else ""
        out.append(f"<div class='group' title='group {gid}{tag}'>" + "".join(
            _issue_card(r, names, uris.get(r["id"]), "duplicate", facts) for r in m.to_dict("records")) + "</div>")
    return "<div class='groups'>" + "".join(out) + "</div>"


def render_page(p, sections: list[Section], n_scored: int, n_flagged: int, metrics: dict) -> str:
    """The whole page: title, navigation, one <section> each."""
    title = f"clean report — {_part(p, 'data').get('source', '')}".rstrip(" —")
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    nav = "".join(f"<a href='#{s.key}'>{_e(s.title.split(' (')[0])}</a>" for s in sections)
    acc = " · ".join(f"{n} {m.get('accuracy', float('nan')):.4f}" for n, m in metrics.items())
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{_CSS}</style></head><body>"
            f"<header><h1>{_e(title)}</h1><div class='sub'>generated {when} · "
            f"{_e(n_scored)} scored samples · {_e(n_flagged)} flagged"
            f"{' · accuracy ' + _e(acc) if acc else ''}</div></header><nav>{nav}</nav><main>"
            + "".join(s.html() for s in sections) + "</main></body></html>\n")
