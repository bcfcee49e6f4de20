"""The paper's figures: DVC plot data (tidy CSV) + a PNG of each, for `dvc plots` and the report.

1. :func:`grad_heatmap`   per-sample gradient magnitude (log10) over training epochs
2. :func:`entropy_topk`   label entropy (nats) of the top-k samples by score vs k, uniform baseline
3. :func:`sweep_plot`     test accuracy vs keep fraction, one line per strategy (± std over seeds)
4. :func:`overlap_topk`   |S_A,k ∩ S_B,k| / k of two score files vs k, random baseline k/N
5. :func:`confusion_png`  confusion matrix of an evaluated model (DVC's built-in `confusion`
                          template renders the CSV written by `clean evaluate`)

Which of the paper's findings each figure checks: docs/methods.md §6.1 (the tracked norms of
figure 1: §1.5; the label entropy of figure 2: §3). Every function takes its input and output
paths as arguments (the defaults are the CLI's). Matplotlib is imported inside the functions
and drawn with the Agg canvas (no pyplot, no display). The Vega-Lite templates for `dvc plots`
live in .dvc/plots/ (sweep.json, heatmap.json); figures 2 and 4 use DVC's built-in `simple`
template with two y columns.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import CleanError
from pipeline.formats.dynamics import load_dynamics
from pipeline.formats.tables import read_csv, read_scores
from pipeline.io import atomic_path, write_frame
from pipeline.scores.order import top_order
from pipeline.views.compare import compare_files, k_grid

#: Smallest gradient norm on the log scale; exact zeros show as the smallest positive norm seen.
LOG_FLOOR = 1e-12


# --------------------------------------------------------------------------- matplotlib helpers


def new_figure(w: float = 7.0, h: float = 4.2, dpi: int = 100):
    """A matplotlib Figure on the Agg canvas (no pyplot, thread-safe)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, out_png: str | Path) -> Path:
    """Write `fig` to `out_png` atomically (PNG)."""

    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return Path(out_png)


def _need(df, cols, path, fix: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise CleanError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(map(str, df.columns))}); {fix}")


# --------------------------------------------------------------------------- 1. gradient heatmap


def grad_heatmap(dynamics_npz: str | Path, out_csv: str | Path, out_png: str | Path, max_samples: int = 64,
                 seed: int = 0):
    """Figure 1: heatmap of log10 per-sample gradient norm [epochs × samples] → tidy DataFrame.

    Reads track_ids [K] and track_grad_norm float [E,K] (eval-mode last-layer ‖∇L‖₂ after each
    epoch) from `dynamics_npz`; shows at most `max_samples` of the K tracked samples (a seeded
    subset), sorted by their final-epoch norm (sample 0 = largest). CSV columns: epoch
    (1-based), sample, id, label, grad_norm, log10_grad_norm. The PNG adds the 10/50/90 %
    quantiles over all K tracked samples per epoch (the spread widens as training goes on).
    """
    import pandas as pd

    dyn = load_dynamics(dynamics_npz, need=())  # the track arrays are checked below, with their own fix
    if "track_grad_norm" not in dyn or "track_ids" not in dyn or dyn["track_grad_norm"].size == 0:
        raise CleanError(f"{dynamics_npz}: no tracked per-epoch gradient norms (track_ids, track_grad_norm); "
                         "retrain with train.track > 0 in params.yaml (`clean train`)")
    g = np.asarray(dyn["track_grad_norm"], np.float64)
    tids = np.asarray(dyn["track_ids"])
    if g.ndim != 2 or g.shape[1] != tids.size:
        raise CleanError(f"{dynamics_npz}: track_grad_norm has shape {list(g.shape)} but track_ids has {tids.size} "
                         "entries (expected [epochs, K] and [K]); re-run `clean train`")
    if isinstance(max_samples, bool) or int(max_samples) < 1:
        raise CleanError(f"max_samples must be >= 1, got {max_samples!r}")
    e, k = g.shape
    sel = np.arange(k)
    if k > max_samples:
        sel = np.sort(np.random.default_rng(seed).choice(k, size=int(max_samples), replace=False))
    sub = g[:, sel]
    order = np.lexsort((tids[sel], -np.nan_to_num(sub[-1], nan=-np.inf)))  # largest final norm first
    sub, ids = sub[:, order], tids[sel][order]
    labels = np.full(ids.size, -1, np.int64)
    if "ids" in dyn and "labels" in dyn:
        pos = pd.Series(np.arange(len(dyn["ids"])), index=np.asarray(dyn["ids"]))
        where = pos.reindex(ids).to_numpy()
        ok = ~np.isnan(where)
        labels[ok] = np.asarray(dyn["labels"])[where[ok].astype(np.int64)]
    pos = g[np.isfinite(g) & (g > 0)]
    floor = max(LOG_FLOOR, float(pos.min())) if pos.size else LOG_FLOOR  # exact zeros → smallest seen
    logg = np.log10(np.maximum(sub, floor))
    m = ids.size
    df = pd.DataFrame({
        "epoch": np.repeat(np.arange(1, e + 1), m), "sample": np.tile(np.arange(m), e),
        "id": np.tile(ids, e), "label": np.tile(labels, e),
        "grad_norm": sub.ravel(), "log10_grad_norm": logg.ravel(),
    })
    write_frame(out_csv, df)

    fig = new_figure(10, 4.6)
    ax, ax2 = fig.subplots(1, 2, width_ratios=[2.2, 1])
    im = ax.imshow(logg.T, aspect="auto", cmap="viridis", interpolation="nearest",
                   extent=(0.5, e + 0.5, m - 0.5, -0.5))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"sample (sorted by final norm; {m} of {k} tracked)")
    ax.set_title("per-sample gradient norm over training")
    fig.colorbar(im, ax=ax, label="log10 ‖∇L‖₂ (last layer)")
    q = np.nanquantile(np.log10(np.maximum(g, floor)), [0.1, 0.5, 0.9], axis=1)
    ep = np.arange(1, e + 1)
    ax2.fill_between(ep, q[0], q[2], alpha=0.25, color="tab:blue", label="10–90 %")
    ax2.plot(ep, q[1], color="tab:blue", marker="o", ms=3, label="median")
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("log10 ‖∇L‖₂")
    ax2.set_title(f"spread over all {k} tracked")
    ax2.legend(fontsize=8)
    save_png(fig, out_png)
    return df


# --------------------------------------------------------------------------- 2. entropy of top-k


def entropy_curve(scores, labels, num_classes: int, ks, by: str = "") -> np.ndarray:
    """Label entropy (nats) of the top-k samples by `scores` [N] for each k in `ks` → [len(ks)].

    labels: int [N] in [0, num_classes). Top = largest score (smallest for margin/aum/confidence).
    """

    y = np.asarray(labels, np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise CleanError(f"labels must be in [0, {num_classes}), got {int(y.min())}..{int(y.max())}; "
                         "check num_classes / classes.json")
    ys = y[top_order(scores, by)]
    ks = np.asarray(ks, np.int64)
    order = np.argsort(ks, kind="stable")
    counts = np.zeros(num_classes, np.float64)
    out = np.empty(ks.size, np.float64)
    done = 0
    for j in order:
        kk = int(ks[j])
        counts += np.bincount(ys[done:kk], minlength=num_classes)
        done = kk
        p = counts[counts > 0] / kk
        out[j] = max(0.0, float(-(p * np.log(p)).sum()))
    return out


def entropy_topk(scores_csv: str | Path, by, num_classes: int | None, out_csv: str | Path, out_png: str | Path,
                 ks=None):
    """Figure 2: label entropy of the top-k samples by score vs k → DataFrame.

    by: a score column or a list of them (the first fills `entropy`, the others
    `entropy_<score>`). num_classes: C (None → max label + 1). CSV columns: k, fraction (k/N),
    entropy, uniform (= ln C), all_labels (entropy of all N labels, what a random subset
    approaches), [entropy_<score> ...]. Entropies in nats, matching `clean prune`'s summary.
    """
    import pandas as pd

    bys = [by] if isinstance(by, str) else list(by)
    if not bys:
        raise CleanError("entropy_topk needs at least one score column (by)")
    df = read_scores(scores_csv, bys)
    y = pd.to_numeric(df["label"], errors="coerce")
    if y.isna().any():
        raise CleanError(f"{scores_csv}: column 'label' must hold integer class ids")
    y = y.to_numpy(np.int64)
    c = int(num_classes) if num_classes is not None else int(y.max()) + 1
    n = y.size
    ks = k_grid(n) if ks is None else np.asarray(ks, np.int64)
    if ks.size and (ks.min() < 1 or ks.max() > n):
        raise CleanError(f"k must be in [1, {n}], got {int(ks.min())}..{int(ks.max())}")
    curves = {}
    for b in bys:
        v = pd.to_numeric(df[b], errors="coerce").to_numpy(np.float64)
        if np.isnan(v).all():
            raise CleanError(f"{scores_csv}: column '{b}' is empty (all NaN); pick another score")
        curves[b] = entropy_curve(v, y, c, ks, by=b)
    cnt = np.bincount(y, minlength=c).astype(float)
    p = cnt[cnt > 0] / n
    out = pd.DataFrame({"k": ks, "fraction": ks / n, "entropy": curves[bys[0]],
                        "uniform": np.log(c), "all_labels": float(-(p * np.log(p)).sum())})
    for b in bys[1:]:
        out[f"entropy_{b}"] = curves[b]
    write_frame(out_csv, out)

    fig = new_figure()
    ax = fig.subplots()
    for i, b in enumerate(bys):
        ax.plot(ks, curves[b], lw=2 if i == 0 else 1.3, label=f"top-k by {b}")
    ax.axhline(np.log(c), color="black", ls="--", lw=1, label=f"uniform ln {c} = {np.log(c):.3f}")
    ax.axhline(out["all_labels"].iloc[0], color="grey", ls=":", lw=1.2, label="all labels (random subset)")
    ax.set_xscale("log")
    ax.set_xlabel(f"k (top-k samples of N = {n})")
    ax.set_ylabel("label entropy (nats)")
    ax.set_ylim(0, np.log(c) * 1.08 if c > 1 else 1)
    ax.set_title("label entropy of the top-k samples")
    ax.legend(fontsize=8, loc="lower right")
    save_png(fig, out_png)
    return out


# --------------------------------------------------------------------------- 3. sweep


def find_sweep_summary(candidates) -> Path | None:
    """The sweep summary among `candidates` (a path, or several: the first that exists, else the
    first, for the message); None when none is given."""
    if candidates is None or isinstance(candidates, (str, Path)):
        return None if candidates is None else Path(candidates)
    paths = [Path(c) for c in candidates]
    return next((c for c in paths if c.exists()), paths[0] if paths else None)


def sweep_plot(summary_csv: str | Path, out_csv: str | Path | None, out_png: str | Path):
    """Figure 3: accuracy vs keep fraction, one line per strategy → tidy DataFrame.

    Reads the sweep summary (strategy, keep, accuracy_mean[, accuracy_std, n_seeds, n_kept]).
    out_csv (None = don't write): columns strategy, keep, accuracy, accuracy_std, lower, upper
    (± 1 std), n_seeds, n_kept. .dvc/plots/sweep.json renders either file (color = strategy,
    dash = revision), so the summary itself can be the DVC plot.
    """
    import pandas as pd

    fix = "it is written by the sweep stage (`dvc repro sweep`)"
    df = read_csv(summary_csv, "sweep summary", fix)
    _need(df, ["strategy", "keep", "accuracy_mean"], summary_csv, fix)
    if len(df) == 0:
        raise CleanError(f"{summary_csv}: no rows; {fix}")
    keep = pd.to_numeric(df["keep"], errors="coerce")
    acc = pd.to_numeric(df["accuracy_mean"], errors="coerce")
    if keep.isna().any() or acc.isna().any():
        raise CleanError(f"{summary_csv}: columns keep and accuracy_mean must be numbers; {fix}")
    std = pd.to_numeric(df.get("accuracy_std", pd.Series(0.0, index=df.index)), errors="coerce").fillna(0.0)
    out = pd.DataFrame({"strategy": df["strategy"].astype(str), "keep": keep.astype(float),
                        "accuracy": acc.astype(float), "accuracy_std": std.astype(float)})
    out["lower"], out["upper"] = out["accuracy"] - out["accuracy_std"], out["accuracy"] + out["accuracy_std"]
    for c in ("n_seeds", "n_kept"):
        out[c] = df[c] if c in df.columns else np.nan
    out = out.sort_values(["strategy", "keep"], kind="stable").reset_index(drop=True)
    if out_csv is not None:
        if Path(out_csv).resolve() == Path(summary_csv).resolve():
            raise CleanError(f"sweep_plot would overwrite its input {summary_csv}; write the tidy CSV elsewhere")
        write_frame(out_csv, out)

    fig = new_figure()
    ax = fig.subplots()
    for s, part in out.groupby("strategy", sort=True):
        style = dict(color="black", ls="--") if s == "random" else {}
        ax.errorbar(part["keep"], part["accuracy"], yerr=part["accuracy_std"], marker="o", ms=4,
                    capsize=3, lw=1.6, label=s, **style)
    if out["keep"].max() / max(out["keep"].min(), 1e-12) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("keep fraction of the training set")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_title("accuracy vs kept data, by selection strategy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, out_png)
    return out


# --------------------------------------------------------------------------- 4. top-k overlap


def overlap_topk(scores_a: str | Path, scores_b: str | Path, by: str, out_csv: str | Path, out_png: str | Path,
                 ks=None, names: tuple[str, str] | None = None):
    """Figure 4: overlap |S_A,k ∩ S_B,k| / k of two score files' top-k sets vs k → DataFrame.

    Ids must match (CleanError otherwise). CSV columns: k, fraction (k/N), overlap,
    random_baseline (= k/N, two random k-subsets). names: legend labels (default: the paths).
    """
    import pandas as pd

    r = compare_files(scores_a, scores_b, by, ks)
    out = pd.DataFrame({"k": r["k"], "fraction": r["k"] / r["n"], "overlap": r["overlap"],
                        "random_baseline": r["random"]})
    write_frame(out_csv, out)
    a, b = names or (str(scores_a), str(scores_b))
    fig = new_figure()
    ax = fig.subplots()
    ax.plot(out["k"], out["overlap"], lw=2, label=f"top-k by {by}: A ∩ B")
    ax.plot(out["k"], out["random_baseline"], color="black", ls="--", lw=1, label="random baseline k/N")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"k (of N = {r['n']})")
    ax.set_ylabel("|S_A,k ∩ S_B,k| / k")
    ax.set_title(f"top-k overlap by {by}\nA = {a}\nB = {b}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, out_png)
    return out


#: Fractions of N at which `clean compare` prints the overlap.
COMPARE_FRACTIONS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5)


def compare_topk(scores_a: str | Path, scores_b: str | Path, by: str, out_csv: str | Path, out_png: str | Path,
                 fractions=COMPARE_FRACTIONS) -> dict:
    """`clean compare`: figure 4 (:func:`overlap_topk`) plus the overlap at a few fractions of N.

    Returns {"curve": overlap_topk's DataFrame, "n": N, "k": [k at each fraction (distinct)],
    "overlap": [overlap at each of those k], "mean_excess": mean of overlap − k/N on the k grid}.
    """

    curve = overlap_topk(scores_a, scores_b, by, out_csv, out_png)
    n = int(round(curve["k"].iloc[-1] / curve["fraction"].iloc[-1]))
    ks = sorted({int(min(n, max(1, round(f * n)))) for f in fractions})
    r = compare_files(scores_a, scores_b, by, ks)
    return {"curve": curve, "n": n, "k": ks, "overlap": [float(o) for o in r["overlap"]],
            "mean_excess": float(np.mean(curve["overlap"] - curve["random_baseline"]))}


# --------------------------------------------------------------------------- 5. confusion


def confusion_counts(confusion_csv: str | Path, classes: list[str] | None = None):
    """Read `actual,predicted` rows → (class names [C], counts int [C,C], rows = actual).

    Class order: `classes` (names not in it are appended), else sorted names.
    """

    fix = "it is written by `clean evaluate` (plots/confusion_<name>.csv)"
    df = read_csv(confusion_csv, "confusion data", fix)
    _need(df, ["actual", "predicted"], confusion_csv, fix)
    a, p = df["actual"].astype(str).to_numpy(), df["predicted"].astype(str).to_numpy()
    names = [str(c) for c in classes] if classes is not None else []
    seen = set(names)
    extra = sorted((set(a) | set(p)) - seen)
    names += extra
    pos = {n: i for i, n in enumerate(names)}
    c = len(names)
    counts = np.zeros((c, c), np.int64)
    if len(df):
        np.add.at(counts, (np.array([pos[x] for x in a]), np.array([pos[x] for x in p])), 1)
    return names, counts


def confusion_png(confusion_csv: str | Path, out_png: str | Path, classes: list[str] | None = None,
                  title: str | None = None) -> np.ndarray:
    """Figure 5: confusion matrix PNG (colour = row-normalised, text = counts) → counts [C,C]."""
    names, counts = confusion_counts(confusion_csv, classes)
    c = len(names)
    if c == 0:
        raise CleanError(f"{confusion_csv}: no rows; re-run `clean evaluate`")
    rows = counts.sum(1, keepdims=True)
    norm = counts / np.maximum(rows, 1)
    acc = np.trace(counts) / max(counts.sum(), 1)
    side = min(9.0, 2.2 + 0.42 * c)
    fig = new_figure(side + 1.2, side)
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="fraction of the actual class", shrink=0.8)
    if c <= 30:
        ax.set_xticks(range(c), names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(c), names, fontsize=8)
    if c <= 20:
        for i in range(c):
            for j in range(c):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.55 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(f"{title or Path(confusion_csv).stem}: accuracy {acc:.4f} (n = {int(counts.sum())})", fontsize=10)
    save_png(fig, out_png)
    return counts


# --------------------------------------------------------------------------- score distributions


def score_hist_png(scores_df, columns: list[str], out_png: str | Path, flagged=None, bins: int = 60) -> Path:
    """Small-multiple histograms of score `columns` of a scores DataFrame (log count axis).

    flagged: optional bool [N]; flagged samples are overlaid in orange.
    """
    import pandas as pd

    cols = [c for c in columns if c in scores_df.columns
            and pd.to_numeric(scores_df[c], errors="coerce").notna().any()]
    if not cols:
        raise CleanError("no score column with values to plot; re-run `clean score`")
    n = len(cols)
    ncol = min(3, n)
    nrow = -(-n // ncol)
    fig = new_figure(3.4 * ncol, 2.3 * nrow)
    axes = np.atleast_1d(fig.subplots(nrow, ncol)).ravel()
    from matplotlib.ticker import NullFormatter

    fl = None if flagged is None else np.asarray(flagged, bool)
    for ax, c in zip(axes, cols):
        v = pd.to_numeric(scores_df[c], errors="coerce").to_numpy(np.float64)
        ok = np.isfinite(v)
        edges = np.histogram_bin_edges(v[ok], bins=bins)
        ax.hist(v[ok], bins=edges, histtype="stepfilled", color="tab:blue", alpha=0.8, label="all")
        if fl is not None and (fl & ok).any():
            ax.hist(v[ok & fl], bins=edges, histtype="stepfilled", color="tab:orange", alpha=0.9, label="flagged")
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.5)  # single-sample bins stay visible on the log axis
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(c, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes[n:]:
        ax.set_visible(False)
    if fl is not None:
        axes[0].legend(fontsize=7)
    save_png(fig, out_png)
    return Path(out_png)
