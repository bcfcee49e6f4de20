"""Image grids, the paper's figures (plot data + PNG), top-k overlap, and the show/compare commands."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.errors import CleanError

CLASSES = ["zero", "one", "two"]
SCORE_COLS = ["loss", "grad_norm", "el2n", "margin", "aum", "forgetting", "confidence", "variability",
              "self_influence", "importance"]


def make_project(root: Path, n: int = 30, classes=CLASSES, hw=(8, 8), epochs: int = 4, track: int = 12,
                 seed: int = 0) -> dict:
    """A tiny synthetic pipeline state under `root`: every file the visual commands read.

    data/ (PNG images, manifest.csv with noisy column, classes.json), scores/ (scores.csv,
    meta.json, flags.csv), models/base/dynamics.npz, metrics/{base,pruned}.json,
    plots/confusion_{base,pruned}.csv, sweep/summary.csv, prune/summary.json. Returns paths.
    """
    rng = np.random.default_rng(seed)
    c = len(classes)
    data = root / "data"
    rows = []
    for i in range(n):
        y = i % c
        img = rng.integers(0, 60, size=hw).astype(np.uint8)
        img[y * hw[0] // c:(y + 1) * hw[0] // c] = 230
        rel = f"images/{classes[y]}/{i:04d}.png"
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(data / rel)
        rows.append((100 + i, rel, y, "train" if i < n - 6 else "test"))
    man = pd.DataFrame(rows, columns=["id", "path", "label", "split"])
    man["orig_label"] = man["label"]
    man["noisy"] = 0
    man.loc[[1, 5], "noisy"] = 1
    man.loc[[1, 5], "label"] = (man.loc[[1, 5], "orig_label"] + 1) % c
    man.to_csv(data / "manifest.csv", index=False)
    (data / "classes.json").write_text(json.dumps({"classes": list(classes)}))

    tr = man[man["split"] == "train"].reset_index(drop=True)
    m = len(tr)
    sc = pd.DataFrame({"id": tr["id"], "path": tr["path"], "label": tr["label"],
                       "pred": tr["orig_label"]})
    for col in SCORE_COLS:
        sc[col] = rng.random(m)
    sc.loc[tr["noisy"] == 1, "loss"] += 5  # the noisy ones are the top losses
    sc["orig_label"], sc["noisy"] = tr["orig_label"], tr["noisy"]
    scores = root / "scores"
    scores.mkdir(parents=True, exist_ok=True)
    sc.to_csv(scores / "scores.csv", index=False)
    (scores / "meta.json").write_text(json.dumps({"manifest": str(data / "manifest.csv"), "model": "small_cnn",
                                                 "norm": "l2", "params": "last", "split": "train", "n": m}))
    flagged = (sc["loss"] > sc["loss"].quantile(0.8)).astype(int)
    pd.DataFrame({"id": sc["id"], "flagged": flagged, "rule": "loss >= q0.80",
                  "value": sc["loss"]}).to_csv(scores / "flags.csv", index=False)

    models = root / "models" / "base"
    models.mkdir(parents=True, exist_ok=True)
    tpos = np.sort(rng.choice(m, size=min(track, m), replace=False))
    g = np.abs(rng.normal(size=(epochs, tpos.size))).astype(np.float32) * np.linspace(1, 0.1, epochs)[:, None]
    g[-1, 0] = 0.0  # an exact zero must not break the log scale
    np.savez(models / "dynamics.npz", ids=tr["id"].to_numpy(), labels=tr["label"].to_numpy(),
             lr=np.full(epochs, 1e-3), loss=rng.random((epochs, m)).astype(np.float32),
             margin=rng.normal(size=(epochs, m)).astype(np.float32),
             p_label=rng.random((epochs, m)).astype(np.float32), correct=rng.random((epochs, m)) > 0.3,
             track_ids=tr["id"].to_numpy()[tpos], track_grad_norm=g)

    metrics, plots = root / "metrics", root / "plots"
    metrics.mkdir(parents=True, exist_ok=True)
    plots.mkdir(parents=True, exist_ok=True)
    te = man[man["split"] == "test"]
    for name, acc in (("base", 0.83), ("pruned", 0.87)):
        (metrics / f"{name}.json").write_text(json.dumps({
            "accuracy": acc, "loss": 0.4, "n": len(te), "model": "small_cnn", "n_train": m,
            "per_class_accuracy": {k: acc for k in classes}, "accuracy_std": 0.01,
            "runs": [{"seed": 0, "accuracy": acc - 0.01}, {"seed": 1, "accuracy": acc + 0.01}]}))
        pred = te["label"].to_numpy().copy()
        pred[0] = (pred[0] + 1) % c
        pd.DataFrame({"actual": np.asarray(classes)[te["label"]], "predicted": np.asarray(classes)[pred]}).to_csv(
            plots / f"confusion_{name}.csv", index=False)

    sweep = root / "sweep"
    sweep.mkdir(parents=True, exist_ok=True)
    srows = [(s, kf, 0.8 + 0.1 * kf + (0.01 if s == "max-gradient" else 0), 0.01, 3, int(kf * m))
             for s in ("random", "max-gradient", "gradient-cdf") for kf in (0.1, 0.3, 0.5, 1.0)]
    pd.DataFrame(srows, columns=["strategy", "keep", "accuracy_mean", "accuracy_std", "n_seeds",
                                 "n_kept"]).to_csv(sweep / "summary.csv", index=False)
    prune = root / "prune"
    prune.mkdir(parents=True, exist_ok=True)
    (prune / "summary.json").write_text(json.dumps({"n_total": m, "n_kept": m - int(flagged.sum()),
                                                    "kept_per_class": {}, "label_entropy":
                                                    {"kept": 1.05, "all": 1.09, "uniform": float(np.log(c))}}))
    return {"root": root, "manifest": data / "manifest.csv", "scores": scores / "scores.csv",
            "flags": scores / "flags.csv", "dynamics": models / "dynamics.npz", "metrics": metrics,
            "plots": plots, "sweep": sweep / "summary.csv", "prune": prune / "summary.json",
            "n_train": m, "flagged_ids": sc["id"][flagged == 1].tolist()}


def _png(path: Path) -> Image.Image:
    assert path.exists(), path
    im = Image.open(path)
    assert im.format == "PNG"
    return im


# --------------------------------------------------------------------------- compare


def test_topk_overlap_matches_brute_force():
    from pipeline.views.compare import topk_overlap

    rng = np.random.default_rng(1)
    a, b = rng.random(50), rng.random(50)
    b[:10] = a[:10] + 5  # shared top
    ks = np.arange(1, 51)
    got = topk_overlap(a, b, ks)
    for k in ks:
        sa, sb = set(np.argsort(-a, kind="stable")[:k]), set(np.argsort(-b, kind="stable")[:k])
        assert got[k - 1] == pytest.approx(len(sa & sb) / k)
    assert got[-1] == 1.0
    assert topk_overlap(a, a, [1, 7, 50]).tolist() == [1.0, 1.0, 1.0]


def test_topk_overlap_aligns_by_id_and_rejects_other_ids():
    from pipeline.views.compare import topk_overlap

    a = pd.Series([3.0, 2.0, 1.0, 0.0], index=[10, 11, 12, 13])
    b = pd.Series([0.0, 1.0, 2.0, 3.0], index=[13, 12, 11, 10])  # same scores, shuffled rows
    assert topk_overlap(a, b, [1, 2, 3]).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(CleanError, match="different samples"):
        topk_overlap(a, pd.Series([1.0, 2, 3, 4], index=[10, 11, 12, 99]), [1])
    with pytest.raises(CleanError, match=r"k must be in \[1, 4\]"):
        topk_overlap(a, b, [5])


def test_low_is_top_for_margin():
    from pipeline.scores.order import top_order

    v = np.array([0.5, -2.0, 3.0, np.nan])
    assert top_order(v, "margin").tolist() == [1, 0, 2, 3]
    assert top_order(v, "loss").tolist() == [2, 0, 1, 3]


# --------------------------------------------------------------------------- grid


def test_image_grid_upscales_small_images_and_colours_captions(tmp_path):
    from pipeline.views.grid import image_grid

    imgs = np.zeros((5, 1, 8, 8), np.uint8)
    imgs[:, :, :4] = 255
    out = image_grid(imgs, [f"{i} · a→b · loss=1.5" for i in range(5)], tmp_path / "g.png",
                     colors=[(200, 30, 30)] + [None] * 4, title="t")
    im = _png(out).convert("RGB")
    a = np.asarray(im)
    # 8x8 upscaled 14x: a 112-px tile; its white top half is 56 rows tall
    col = a[:, :, 0].max(axis=1) == 255
    assert col.sum() >= 56
    assert ((a[..., 0] > 150) & (a[..., 1] < 80)).any()  # red caption pixels
    with pytest.raises(CleanError, match="titles"):
        image_grid(imgs, ["x"], tmp_path / "bad.png")
    empty = image_grid(np.zeros((0, 1, 8, 8), np.uint8), [], tmp_path / "e.png")
    _png(empty)


def test_top_grid_picks_top_losses_and_only_flagged(tmp_path):
    from pipeline.views.grid import top_grid

    p = make_project(tmp_path)
    shown = top_grid(p["scores"], by="loss", k=4, path=tmp_path / "top.png", flags_csv=p["flags"])
    sc = pd.read_csv(p["scores"])
    assert shown["id"].tolist() == sc.sort_values("loss", ascending=False)["id"].head(4).tolist()
    assert {101, 105} <= set(shown["id"])  # the injected-noise samples have the top losses
    assert _png(tmp_path / "top.png").width > 300
    only = top_grid(p["scores"], by="grad_norm", k=100, path=tmp_path / "fl.png", flags_csv=p["flags"],
                    only_flagged=True)
    assert sorted(only["id"]) == sorted(p["flagged_ids"])
    val = top_grid(p["scores"], by="value", k=2, path=tmp_path / "v.png", flags_csv=p["flags"], only_flagged=True)
    assert set(val["id"]) == {101, 105}  # value = loss here; the noisy two are on top
    low = top_grid(p["scores"], by="margin", k=3, path=tmp_path / "m.png")
    assert low["margin"].tolist() == sorted(sc["margin"])[:3]


def test_top_grid_errors_name_the_file_and_fix(tmp_path):
    from pipeline.views.grid import top_grid

    p = make_project(tmp_path)
    with pytest.raises(CleanError, match="no score column|missing column.*nope"):
        top_grid(p["scores"], by="nope", path=tmp_path / "x.png")
    with pytest.raises(CleanError, match="not found.*clean score"):
        top_grid(tmp_path / "missing.csv", path=tmp_path / "x.png")
    with pytest.raises(CleanError, match="clean flag"):
        top_grid(p["scores"], only_flagged=True, path=tmp_path / "x.png")
    bad = tmp_path / "flags_bad.csv"
    bad.write_text("id,flagged\n100,2\n")
    with pytest.raises(CleanError, match="flags_bad.csv.*0 or 1"):
        top_grid(p["scores"], flags_csv=bad, path=tmp_path / "x.png")
    (tmp_path / "data" / "images" / "one" / "0001.png").unlink()
    with pytest.raises(CleanError, match="0001.png"):
        top_grid(p["scores"], k=30, path=tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------- figures


def test_grad_heatmap_tidy_csv_and_png(tmp_path):
    from pipeline.views.plots import grad_heatmap

    p = make_project(tmp_path, epochs=5, track=12)
    df = grad_heatmap(p["dynamics"], tmp_path / "h.csv", tmp_path / "h.png", max_samples=8)
    assert list(df.columns) == ["epoch", "sample", "id", "label", "grad_norm", "log10_grad_norm"]
    assert len(df) == 5 * 8 and df["epoch"].min() == 1 and df["epoch"].max() == 5
    assert np.isfinite(df["log10_grad_norm"]).all()
    last = df[df["epoch"] == 5].sort_values("sample")["grad_norm"].to_numpy()
    assert (np.diff(last) <= 0).all()  # sample 0 = largest final norm
    assert (df["label"] >= 0).all()
    assert pd.read_csv(tmp_path / "h.csv").shape == df.shape
    _png(tmp_path / "h.png")
    np.savez(tmp_path / "old.npz", ids=np.arange(3), labels=np.zeros(3, int))
    with pytest.raises(CleanError, match="old.npz.*train.track"):
        grad_heatmap(tmp_path / "old.npz", tmp_path / "o.csv", tmp_path / "o.png")


def test_entropy_topk(tmp_path):
    from pipeline.views.plots import entropy_curve, entropy_topk

    labels = np.array([0, 0, 0, 1, 2, 1])
    scores = np.array([9.0, 8, 7, 6, 5, 4])
    h = entropy_curve(scores, labels, 3, [1, 3, 4, 6])
    assert h[0] == 0.0 and h[1] == 0.0
    assert h[2] == pytest.approx(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))
    assert h[3] == pytest.approx(np.log(3) - 0.0, abs=0.1)
    p = make_project(tmp_path)
    df = entropy_topk(p["scores"], ["grad_norm", "loss"], 3, tmp_path / "e.csv", tmp_path / "e.png")
    assert {"k", "entropy", "uniform", "all_labels", "entropy_loss"} <= set(df.columns)
    assert df["k"].iloc[-1] == p["n_train"] and df["uniform"].iloc[0] == pytest.approx(np.log(3))
    assert df["entropy"].iloc[-1] == pytest.approx(df["all_labels"].iloc[0])
    _png(tmp_path / "e.png")


def test_sweep_plot(tmp_path):
    from pipeline.views.plots import sweep_plot

    p = make_project(tmp_path)
    df = sweep_plot(p["sweep"], tmp_path / "s.csv", tmp_path / "s.png")
    assert set(df["strategy"]) == {"random", "max-gradient", "gradient-cdf"}
    assert (df["upper"] - df["lower"]).round(6).eq(0.02).all()
    _png(tmp_path / "s.png")
    assert sweep_plot(p["sweep"], None, tmp_path / "s3.png").shape == df.shape  # PNG only
    with pytest.raises(CleanError, match="overwrite its input"):
        sweep_plot(p["sweep"], p["sweep"], tmp_path / "s4.png")
    bad = tmp_path / "bad.csv"
    bad.write_text("strategy,keep\nrandom,0.5\n")
    with pytest.raises(CleanError, match="bad.csv.*accuracy_mean"):
        sweep_plot(bad, tmp_path / "s2.csv", tmp_path / "s2.png")


def test_overlap_topk_files(tmp_path):
    from pipeline.views.plots import overlap_topk

    p = make_project(tmp_path)
    sc = pd.read_csv(p["scores"])
    other = sc.sample(frac=1.0, random_state=0)
    other.to_csv(tmp_path / "b.csv", index=False)
    df = overlap_topk(p["scores"], tmp_path / "b.csv", "grad_norm", tmp_path / "o.csv", tmp_path / "o.png")
    assert list(df.columns) == ["k", "fraction", "overlap", "random_baseline"]
    assert (df["overlap"] == 1.0).all()  # same scores, rows shuffled: aligned by id
    assert df["random_baseline"].iloc[-1] == 1.0
    _png(tmp_path / "o.png")
    other.iloc[1:].to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(CleanError, match="c.csv.*different samples"):
        overlap_topk(p["scores"], tmp_path / "c.csv", "grad_norm", tmp_path / "o2.csv", tmp_path / "o2.png")


def test_confusion_png(tmp_path):
    from pipeline.views.plots import confusion_png

    p = make_project(tmp_path)
    counts = confusion_png(p["plots"] / "confusion_base.csv", tmp_path / "c.png", CLASSES)
    assert counts.shape == (3, 3) and counts.sum() == 6 and np.trace(counts) == 5
    _png(tmp_path / "c.png")


# --------------------------------------------------------------------------- CLI


def _app():
    import typer

    from cli.visual import compare, figures, report, show

    app = typer.Typer()
    for fn in (show, report, compare, figures):
        app.command()(fn)
    return app


def test_cli_show_and_compare(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    p = make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    r = runner.invoke(_app(), ["show", "--by", "loss", "--k", "6"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "reports" / "top_loss.png").exists() and "label ≠ prediction" in r.output
    pd.read_csv(p["scores"]).sample(frac=1.0, random_state=1).to_csv(tmp_path / "b.csv", index=False)
    r = runner.invoke(_app(), ["compare", str(p["scores"]), "b.csv", "--by", "loss"])
    assert r.exit_code == 0, r.output
    assert "overlap" in r.output and (tmp_path / "plots" / "overlap.csv").exists()
    r = runner.invoke(_app(), ["show", "--by", "nope"])
    assert r.exit_code == 2 and "nope" in r.output


def test_cli_figures(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    p = make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(_app(), ["figures", "--dynamics", str(p["dynamics"])])  # finds sweep/summary.csv
    assert r.exit_code == 0, r.output
    for f in ("grad_heatmap.csv", "grad_heatmap.png", "entropy_topk.csv", "sweep.png",
              "confusion_base.png", "confusion_pruned.png"):
        assert (tmp_path / "plots" / f).exists(), f
    ent = pd.read_csv(tmp_path / "plots" / "entropy_topk.csv")
    assert "entropy_loss" in ent.columns and ent["uniform"].iloc[0] == pytest.approx(np.log(3))
    p["sweep"].unlink()
    r = CliRunner().invoke(_app(), ["figures", "sweep"])
    assert r.exit_code == 2 and "summary.csv" in r.output
    r = CliRunner().invoke(_app(), ["figures", "heatmap", "entropy", "--dynamics", str(p["dynamics"])])
    assert r.exit_code == 0, r.output


def test_visual_module_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, cli.visual; heavy = [m for m in ('numpy', 'pandas', 'matplotlib', 'torch', 'PIL') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------- DVC plot templates

DVC_PLOTS_YAML = """
plots:
  - plots/grad_heatmap.csv:
      template: heatmap
      x: epoch
      y: log10_grad_norm
  - entropy_topk:
      template: topk
      x: k
      y:
        plots/entropy_topk.csv: [entropy, uniform, all_labels]
  - plots/sweep.csv:
      template: sweep
      x: keep
      y: accuracy_mean
  - overlap_topk:
      template: topk
      x: k
      y:
        plots/overlap.csv: [overlap, random_baseline]
"""


def test_dvc_templates_render_with_real_dvc(tmp_path):
    """`dvc plots show --json` fills every custom template in .dvc/plots without error or leftover anchors."""
    import shutil
    import subprocess
    import sys

    from pipeline.views import plots

    repo = Path(__file__).resolve().parents[1]
    templates = sorted((repo / ".dvc" / "plots").glob("*.json"))
    assert {t.stem for t in templates} >= {"heatmap", "sweep", "topk"}
    for t in templates:
        spec = json.loads(t.read_text())
        assert "<DVC_METRIC_DATA>" in json.dumps(spec), t
    p = make_project(tmp_path / "src")
    work = tmp_path / "repo"
    (work / ".dvc" / "plots").mkdir(parents=True)
    (work / ".dvc" / "config").write_text("[core]\n    no_scm = True\n    analytics = false\n")
    for t in templates:
        shutil.copy(t, work / ".dvc" / "plots" / t.name)
    out = work / "plots"
    plots.grad_heatmap(p["dynamics"], out / "grad_heatmap.csv", out / "grad_heatmap.png")
    plots.entropy_topk(p["scores"], "grad_norm", 3, out / "entropy_topk.csv", out / "entropy_topk.png")
    shutil.copy(p["sweep"], out / "sweep.csv")  # the summary as `clean sweep collect` writes it
    plots.overlap_topk(p["scores"], p["scores"], "loss", out / "overlap.csv", out / "overlap.png")
    (work / "dvc.yaml").write_text(DVC_PLOTS_YAML)
    r = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json"], cwd=work, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert not res.get("errors"), res["errors"]
    assert set(res["data"]) == {"plots/grad_heatmap.csv", "entropy_topk", "plots/sweep.csv", "overlap_topk"}
    for name, items in res["data"].items():
        assert len(items) == 1 and items[0]["type"] == "vega", name
        spec = json.dumps(items[0]["content"])
        assert "<DVC_METRIC" not in spec, name
        assert len(items[0]["content"]["data"]["values"]) > 0, name
