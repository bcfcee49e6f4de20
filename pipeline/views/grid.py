"""Image grids of the top-scoring / flagged samples (like fastai's ``plot_top_losses``).

:func:`image_grid` lays out uint8 images [K,C,H,W] as captioned tiles in one PNG (PIL only:
exact pixels, small images upscaled with nearest-neighbour so an 8×8 digit stays readable).
:func:`top_grid` picks the k most suspicious samples of a scores file (the suspicious end of
each score is the SCORES registry's, pipeline/scores/order.py; docs/methods.md §1.1),
optionally only the flagged ones, and draws them captioned "id · label→pred · score=value";
tiles whose prediction disagrees with the label are red. :func:`show_top` is `clean show`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from pipeline.data.images import load_images
from pipeline.errors import CleanError
from pipeline.formats.manifest import classes_path_for, read_classes, read_manifest
from pipeline.formats.tables import join_flags, read_flags, read_scores
from pipeline.io import atomic_path
from pipeline.scores.order import low_is_suspicious, top_order

#: Upscaled small images aim for about this many pixels on their longer side.
TILE_PX = 112
#: Images larger than this (longer side) are shrunk to TILE_PX·1.5 for the grid.
MAX_TILE_PX = 256
RED = (200, 30, 30)
INK = (25, 25, 25)
FLAG = (235, 140, 0)


def _font(size: int, bold: bool = False):
    """DejaVu Sans from matplotlib's bundled fonts (PIL's default font if unavailable)."""
    from PIL import ImageFont

    try:
        import matplotlib

        name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)
    except Exception:  # noqa: BLE001 - any font problem: fall back to PIL's own
        return ImageFont.load_default()


def default_upscale(h: int, w: int) -> int:
    """Integer nearest-neighbour factor bringing the longer side near TILE_PX (≥ 1)."""
    return max(1, int(math.ceil(TILE_PX / max(h, w, 1))))


def to_pil(img_u8: np.ndarray, upscale: int = 1):
    """One uint8 image [C,H,W] (C = 1 or 3) → PIL image, upscaled `upscale`× (nearest)."""
    from PIL import Image

    a = np.asarray(img_u8)
    if a.ndim != 3 or a.shape[0] not in (1, 3):
        raise CleanError(f"expected an image of shape [C,H,W] with C = 1 or 3, got {list(a.shape)}")
    im = Image.fromarray(a[0] if a.shape[0] == 1 else np.ascontiguousarray(a.transpose(1, 2, 0)))
    if upscale > 1:
        im = im.resize((im.width * upscale, im.height * upscale), Image.NEAREST)
    return im


def _wrap(text: str, font, width: int) -> list[str]:
    """Split a caption into lines that fit `width` px: at '\\n', then at ' · ', then truncate."""
    out = []
    for line in text.split("\n"):
        parts = line.split(" · ")
        cur = ""
        for p in parts:
            cand = p if not cur else f"{cur} · {p}"
            if font.getlength(cand) <= width or not cur:
                cur = cand
            else:
                out.append(cur)
                cur = p
        out.append(cur)
    fitted = []
    for line in out:
        while len(line) > 1 and font.getlength(line) > width:
            line = line[:-2] + "…"
        fitted.append(line)
    return fitted


def image_grid(images_u8: np.ndarray, titles: list[str], path: str | Path, cols: int | None = None,
               upscale: int | None = None, colors: list | None = None, frames: list | None = None,
               title: str | None = None) -> Path:
    """Write images uint8 [K,C,H,W] as a captioned grid PNG at `path`; returns the path.

    titles: K captions ("\\n" or " · " separate lines). cols: tiles per row (default
    ceil(sqrt(K))). upscale: nearest-neighbour factor (default: longer side → ~112 px; images
    over 256 px are shrunk instead). colors: K caption colours (RGB tuples or None = dark);
    frames: K frame colours (None = no frame). title: optional heading line. K = 0 writes a
    small PNG saying there is nothing to show.
    """
    from PIL import Image, ImageDraw

    imgs = np.asarray(images_u8)
    k = 0 if imgs.size == 0 and imgs.ndim != 4 else len(imgs)
    if k and (imgs.ndim != 4 or imgs.shape[1] not in (1, 3) or imgs.dtype != np.uint8):
        raise CleanError(f"image_grid needs uint8 images [K,C,H,W] with C = 1 or 3, got {imgs.dtype} {list(imgs.shape)}")
    if len(titles) != k:
        raise CleanError(f"image_grid: {k} images but {len(titles)} titles; pass one title per image")
    font, head_font = _font(12), _font(15, bold=True)
    pad = 6
    if k == 0:
        canvas = Image.new("RGB", (420, 60), "white")
        ImageDraw.Draw(canvas).text((pad, 20), (title + ": " if title else "") + "no samples to show",
                                    fill=INK, font=head_font)
        with atomic_path(path) as tmp:
            canvas.save(tmp, format="PNG")
        return Path(path)

    h, w = imgs.shape[2], imgs.shape[3]
    shrink = max(h, w) > MAX_TILE_PX
    if upscale is None:
        upscale = 1 if shrink else default_upscale(h, w)
    if upscale < 1:
        raise CleanError(f"upscale must be an integer >= 1, got {upscale}")
    if shrink:
        s = (TILE_PX * 1.5) / max(h, w)
        tw, th = max(1, round(w * s)), max(1, round(h * s))
    else:
        tw, th = w * upscale, h * upscale
    cols = cols or max(1, math.ceil(math.sqrt(k)))
    if cols < 1:
        raise CleanError(f"cols must be >= 1, got {cols}")
    rows = math.ceil(k / cols)
    cell_w = max(tw, 150)
    lines = [_wrap(t, font, cell_w - 2) for t in titles]
    line_h = 15
    cap_h = line_h * max(len(ls) for ls in lines) + 4
    cell_h = th + cap_h
    width = pad + cols * (cell_w + pad)
    head = _wrap(title, head_font, width - 2 * pad) if title else []
    head_h = 19 * len(head) + 8 if head else 0
    canvas = Image.new("RGB", (width, head_h + pad + rows * (cell_h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, line in enumerate(head):
        draw.text((pad, 6 + 19 * j), line, fill=INK, font=head_font)
    for i in range(k):
        r, c = divmod(i, cols)
        x0, y0 = pad + c * (cell_w + pad), head_h + pad + r * (cell_h + pad)
        im = to_pil(imgs[i], 1 if shrink else upscale)
        if shrink:
            im = im.resize((tw, th), Image.LANCZOS)
        xi = x0 + (cell_w - tw) // 2
        canvas.paste(im.convert("RGB"), (xi, y0))
        frame = frames[i] if frames else None
        if frame:
            draw.rectangle([xi - 3, y0 - 3, xi + tw + 2, y0 + th + 2], outline=frame, width=3)
        color = (colors[i] if colors else None) or INK
        for j, line in enumerate(lines[i]):
            lw = font.getlength(line)
            draw.text((x0 + (cell_w - lw) / 2, y0 + th + 3 + j * line_h), line, fill=color, font=font)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)


# --------------------------------------------------------------------------- scores → grid


def resolve_manifest(scores_csv: str | Path, manifest: str | Path | None = None,
                     fallback: str | Path | None = None) -> Path | None:
    """The manifest a scores file came from: `manifest` (must exist), else the one the scores'
    meta.json names (when it exists), else `fallback` (when given and it exists), else None."""
    if manifest is not None:
        m = Path(manifest)
        if not m.exists():
            raise CleanError(f"manifest not found: {m}; pass the manifest the scores were computed on (--manifest)")
        return m
    meta = Path(scores_csv).parent / "meta.json"
    if meta.exists():
        try:
            m = json.loads(meta.read_text()).get("manifest")
        except (json.JSONDecodeError, AttributeError):
            m = None
        if m and Path(m).exists():
            return Path(m)
    return Path(fallback) if fallback is not None and Path(fallback).exists() else None


def class_names(manifest: Path | None, classes: list[str] | None = None) -> list[str] | None:
    """Class names: `classes` if given, else classes.json beside `manifest`, else None."""
    if classes is not None:
        return list(classes)
    if manifest is None:
        return None

    p = classes_path_for(manifest)
    return read_classes(p)["classes"] if p.exists() else None


def namer(classes: list[str] | None):
    """label int → class name (or the int as text when unknown)."""
    def name(i) -> str:
        try:
            i = int(i)
        except (TypeError, ValueError):
            return str(i)
        return classes[i] if classes is not None and 0 <= i < len(classes) else str(i)
    return name


def pick_top(df, by: str, k: int, only_flagged: bool = False):
    """The k most suspicious rows of `df` by column `by` (see compare.top_order) → DataFrame."""

    if only_flagged:
        df = df[df["flagged"]]
    vals = df[by].to_numpy(np.float64)
    order = top_order(vals, by, df["id"].to_numpy())
    order = order[~np.isnan(vals[order])][:k]
    return df.iloc[order]


def fmt_value(v) -> str:
    """Compact number for captions: 3 significant digits, NaN as 'nan'."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "nan" if v != v else f"{v:.3g}"


def _ranked(scores_csv: str | Path, by: str, k: int, flags_csv: str | Path | None, only_flagged: bool,
            issue: str | None = None):
    """scores (+ flags) → the k most suspicious rows by `by` ("value" = the flag rule's value);
    with `issue`, the samples with that issue type (flags.csv is_<issue>) by <issue>_score."""
    import pandas as pd

    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise CleanError(f"k must be a positive integer, got {k!r}")
    if issue is not None:
        return _ranked_issue(scores_csv, issue, k, flags_csv)
    flag_value = by == "value"
    if flag_value and flags_csv is None:
        raise CleanError("--by value ranks by the flag rule's value and needs a flags file; run `clean flag` first")
    df = read_scores(scores_csv, ["path", "pred"] + ([] if flag_value else [by]))
    if flags_csv is not None:
        df = join_flags(df, read_flags(flags_csv), flags_csv)
        if flag_value:
            df["value"] = df["flag_value"]
    else:
        if only_flagged:
            raise CleanError("only_flagged needs a flags file; run `clean flag` first (writes scores/flags.csv)")
        df["flagged"], df["rule"] = False, ""
    df[by] = pd.to_numeric(df[by], errors="coerce").astype(np.float64)
    if df[by].isna().all():
        raise CleanError(f"{scores_csv}: column '{by}' is empty (all NaN); pick another score (--by)")
    return pick_top(df, by, int(k), only_flagged)


def _ranked_issue(scores_csv, issue: str, k: int, flags_csv):
    """The k most severe samples of issue type `issue` (flagged = has it), by <issue>_score."""
    if flags_csv is None or not Path(flags_csv).exists():
        raise CleanError(f"--issue {issue} needs the flags file; run `clean flag` first (writes scores/flags.csv)")
    fl = read_flags(flags_csv)
    if f"is_{issue}" not in fl.columns:
        have = [c[3:] for c in fl.columns if c.startswith("is_")]
        raise CleanError(f"{flags_csv} has no issue type {issue!r}; it has: {', '.join(have) or 'none (re-run `clean flag`)'}")
    df = read_scores(scores_csv, ["path", "pred"]).merge(
        fl[["id", f"is_{issue}", f"{issue}_score", "rule"]], on="id", how="inner")
    df["flagged"] = df[f"is_{issue}"].astype(bool)
    return pick_top(df, f"{issue}_score", int(k), True)


def _draw_top(top, by: str, path: str | Path, names, base: Path, only_flagged: bool, framed: bool,
              cols: int | None) -> None:
    """The grid PNG of the ranked rows `top`: captions id · label→pred · by=value, red when wrong."""

    imgs = load_images(top["path"].tolist(), base) if len(top) else np.zeros((0, 1, 1, 1), np.uint8)
    titles, colors, frames = [], [], []
    for r in top.itertuples(index=False):
        wrong = int(r.label) != int(r.pred)
        titles.append(f"{r.id} · {names(r.label)}→{names(r.pred)} · {by}={fmt_value(getattr(r, by))}")
        colors.append(RED if wrong else None)
        frames.append(FLAG if r.flagged else None)
    what = "flagged samples" if only_flagged else "samples"
    heading = (f"top {len(top)} {what} by {by} ({'lowest' if low_is_suspicious(by) else 'highest'} first) · "
               f"red caption: label ≠ prediction" + (" · orange frame: flagged" if framed and not only_flagged else ""))
    image_grid(imgs, titles, path, cols=cols, colors=colors, frames=frames, title=heading)


def manifest_paths(df, manifest: str | Path, strict: bool = True):
    """`df` with each row's `path` replaced by the image the manifest lists for its id: a scores
    file names paths too, but only the manifest's (the prepared source) are ever opened. An id
    the manifest lacks: CleanError (`strict`), else path None (no image)."""

    m = read_manifest(manifest).set_index("id")["path"]
    known = df["id"].isin(m.index).to_numpy()
    if strict and not known.all():
        bad = int(df["id"].to_numpy()[~known][0])
        raise CleanError(f"scores hold id {bad} which is not in {manifest}; the scores come from another manifest: "
                         "pass the one they were computed on (--manifest) or rerun `clean score`")
    paths = np.full(len(df), None, dtype=object)
    paths[known] = m.reindex(df["id"].to_numpy()[known]).to_numpy()
    return df.assign(path=paths)


def _top_grid(scores_csv, by, k, path, flags_csv, only_flagged, classes, manifest, fallback_manifest, cols,
              issue=None):
    """top_grid's work → (rows shown, label namer)."""
    if issue is not None:
        by, only_flagged = f"{issue}_score", True
    top = _ranked(scores_csv, by, k, flags_csv, only_flagged, issue)
    man = resolve_manifest(scores_csv, manifest, fallback_manifest)
    if man is not None:
        top = manifest_paths(top, man)
    names = namer(class_names(man, classes))
    base = man.parent if man is not None else Path(scores_csv).parent
    _draw_top(top, by, path, names, base, only_flagged, bool(flags_csv), cols)
    keep = ["id", "label", "pred", f"{issue}_score" if issue else by, "flagged", "rule", "path"]
    return top[keep].reset_index(drop=True), names


def top_grid(scores_csv: str | Path, by: str = "loss", k: int = 36, *, path: str | Path,
             flags_csv: str | Path | None = None, only_flagged: bool = False, classes: list[str] | None = None,
             manifest: str | Path | None = None, fallback_manifest: str | Path | None = None,
             cols: int | None = None):
    """Grid PNG at `path` of the k most suspicious samples by score `by` → DataFrame of the rows shown.

    by: a score column, or "value" = the flag rule's value from flags_csv (any flag method).
    flags_csv: optional flags.csv (flagged tiles get an orange frame; with only_flagged, only
    flagged samples are candidates). Images resolve through `manifest` (None: the one the
    scores' meta.json names, else `fallback_manifest`, else paths relative to the scores
    file) and class names through classes.json beside it. Returned columns: id, label, pred,
    <by>, flagged, rule, path.
    """
    return _top_grid(scores_csv, by, k, path, flags_csv, only_flagged, classes, manifest, fallback_manifest,
                     cols)[0]


def show_top(scores_csv: str | Path, by: str, k: int, path: str | Path, flags_csv: str | Path,
             only_flagged: bool, manifest: str | Path | None, fallback_manifest: str | Path | None,
             cols: int | None, issue: str | None = None) -> dict:
    """`clean show`: :func:`top_grid` with `flags_csv` used when it exists (required with only_flagged).

    Returns {"shown": the rows shown (top_grid's columns), "names": label int → class name,
    "n_wrong": how many of them have label ≠ prediction, "path": the PNG}.
    """
    use_flags = flags_csv if (Path(flags_csv).exists() or only_flagged or issue) else None
    shown, names = _top_grid(scores_csv, by, k, path, use_flags, only_flagged, None, manifest, fallback_manifest,
                             cols, issue)
    return {"shown": shown, "names": names, "n_wrong": int((shown["label"] != shown["pred"]).sum()),
            "path": Path(path)}
