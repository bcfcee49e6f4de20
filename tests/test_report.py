"""`clean report`: a self-contained reports/index.html that shows every result."""
from __future__ import annotations

import base64
import io
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from pipeline.errors import CleanError
from tests.test_visual import make_project


class _Imgs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.cards = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a.get("src", ""))
        if tag == "figure" and "data-id" in a:
            self.cards.append(int(a["data-id"]))


def _parse(path: Path) -> tuple[str, _Imgs]:
    text = path.read_text(encoding="utf-8")
    p = _Imgs()
    p.feed(text)
    return text, p


def _check_images(html_path: Path, srcs: list[str]) -> int:
    """Every data: URI decodes to a PNG; every other src is an existing file relative to the page."""
    for s in srcs:
        if s.startswith("data:"):
            assert s.startswith("data:image/png;base64,"), s[:40]
            im = Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1], validate=True)))
            assert im.format == "PNG"
            im.load()
        else:
            assert (html_path.parent / s).exists(), s
    return len(srcs)


def _build(p, out, **kw):
    from pipeline.stages.report import report as build_report

    args = dict(manifest=p["manifest"], scores_csv=p["scores"], flags_csv=p["flags"], metrics_dir=p["metrics"],
                plots_dir=p["plots"], sweep_summary=p["sweep"], dynamics=p["dynamics"],
                params=p["root"] / "params.yaml", prune_summary=p["prune"])
    args.update(kw)
    return build_report(out, **args)


def test_report_full(tmp_path):
    p = make_project(tmp_path, n=60)
    (tmp_path / "params.yaml").write_text("model:\n  name: small_cnn\ntrain:\n  epochs: 4\n")
    from pipeline.views.plots import overlap_topk  # what `clean compare` leaves in plots/

    overlap_topk(p["scores"], p["scores"], "grad_norm", p["plots"] / "overlap.csv", p["plots"] / "overlap.png")
    r = _build(p, tmp_path / "reports")
    html_path = tmp_path / "reports" / "index.html"
    assert r["path"] == str(html_path) and html_path.exists()
    text, parsed = _parse(html_path)
    assert r["sections"] == {k: "ok" for k in r["sections"]}, r["sections"]
    # images: thumbnails + top grid + histograms + 5 figures (2 confusion matrices), all valid PNGs
    n = _check_images(html_path, parsed.srcs)
    assert n >= len(p["flagged_ids"]) + 7
    # every flagged id is shown as a card, named in the HTML
    assert sorted(parsed.cards) == sorted(p["flagged_ids"]) == sorted(r["shown_ids"])
    for i in parsed.cards:
        assert f"#{i}<" in text
    # header: model, params, accuracy of each version, prune summary
    for needle in ("small_cnn", "0.83", "0.87", "pruned", "per-class accuracy", "epochs: 4",
                   "label entropy kept", "injected noise", "precision"):
        assert needle in text, needle
    # figures also kept as files with their data
    figs = tmp_path / "reports" / "figures"
    for f in ("grad_heatmap.png", "grad_heatmap.csv", "entropy_topk.csv", "sweep.csv", "score_hist.png",
              "confusion_base.png", "confusion_pruned.png", "top_loss.png"):
        assert (figs / f).exists(), f
    assert "http://" not in text and "https://" not in text  # opens from disk, no network


def test_report_missing_optional_inputs_become_notes(tmp_path):
    p = make_project(tmp_path)
    for f in (p["flags"], p["sweep"], p["prune"], p["dynamics"]):
        f.unlink()
    shutil.rmtree(p["metrics"])
    shutil.rmtree(p["plots"])
    r = _build(p, tmp_path / "out")
    st = r["sections"]
    assert st["summary"] == "ok" and st["flagged"] == "ok"  # top by loss per class instead of flags
    for k in ("sweep", "heatmap", "overlap", "confusion"):
        assert st[k].startswith("missing"), (k, st[k])
    text, parsed = _parse(tmp_path / "out" / "index.html")
    _check_images(tmp_path / "out" / "index.html", parsed.srcs)
    assert "run `clean flag`" in text and "dvc repro sweep" in text and "clean evaluate" in text
    assert "clean compare" in text and "train.track" in text or "clean train" in text
    # nothing flagged: cards are the top losses per class, still named by id
    for i in parsed.cards:
        assert f"#{i}<" in text
    # no scores at all: still a page
    p["scores"].unlink()
    r = _build(p, tmp_path / "out2")
    assert r["sections"]["flagged"].startswith("missing") and "clean score" in r["sections"]["flagged"]


def test_report_caps_cards_per_class_and_compares(tmp_path):
    p = make_project(tmp_path, n=300)
    sc = pd.read_csv(p["scores"])
    sc.assign(grad_norm=sc["grad_norm"] * 2).sample(frac=1.0, random_state=0).to_csv(tmp_path / "b.csv", index=False)
    r = _build(p, tmp_path / "rep", max_per_class=3, compare_scores=tmp_path / "b.csv")
    text, parsed = _parse(tmp_path / "rep" / "index.html")
    assert len(parsed.cards) == 9 == r["n_shown"]
    assert r["n_flagged"] == len(p["flagged_ids"]) > 9
    assert re.search(r"showing 3 of \d+ flagged", text)
    assert r["sections"]["overlap"] == "ok" and (tmp_path / "rep" / "figures" / "overlap.csv").exists()
    ov = pd.read_csv(tmp_path / "rep" / "figures" / "overlap.csv")
    assert (ov["overlap"] == 1.0).all()  # scaled scores rank the same


def test_report_bad_inputs_raise_clean_errors(tmp_path):
    p = make_project(tmp_path)
    with pytest.raises(CleanError, match="max_per_class"):
        _build(p, tmp_path / "r", max_per_class=0)
    with pytest.raises(CleanError, match="'nope'"):
        _build(p, tmp_path / "r", by="nope")
    p["flags"].write_text("id,flagged,rule,value\n999999,1,x,1\n")
    with pytest.raises(CleanError, match="flags.csv.*999999.*clean flag"):
        _build(p, tmp_path / "r")
    assert not (tmp_path / "r" / "index.html").exists()


def test_report_cli(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tests.test_visual import _app

    p = make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    shutil.move(str(tmp_path / "models"), str(tmp_path / "m"))
    r = CliRunner().invoke(_app(), ["report", "--manifest", str(p["manifest"]), "--dynamics", "m/base/dynamics.npz"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "reports" / "index.html").exists() and "index.html" in r.output


def test_report_duplicate_cards_give_the_pair_distance_and_its_cut(tmp_path):
    """A duplicate set's cards say why each copy is one: its aligned pixel distance and the cut it had
    to be under (flags.csv duplicate_cut, issues.json copy_ratio), or the same pixels."""
    import json

    import numpy as np

    p = make_project(tmp_path, n=60)
    fl = pd.read_csv(p["flags"])
    ids = fl["id"].to_numpy()
    a, b, c = ids[:3]
    fl["is_duplicate"] = fl["id"].isin([b, c]).astype(int)
    fl["duplicate_score"] = np.where(fl["id"] == b, 0.999, np.where(fl["id"] == c, 1.0, 0.0))
    fl["duplicate_group"] = np.where(fl["id"].isin([a, b, c]), 0, -1)
    fl["duplicate_of"] = np.where(fl["id"].isin([a, b, c]), a, -1)
    fl["duplicate_conflict"] = 0
    fl["duplicate_cut"] = np.where(fl["id"] == b, 0.004, np.where(fl["id"].isin([a, c]), 0.0, np.nan))
    fl.to_csv(p["flags"], index=False)
    # a test image of the manifest copies the kept one (issues.json's leakage pair): shown in the set too
    man = pd.read_csv(p["manifest"])
    ev = int(man.loc[man["split"] == "test", "id"].iloc[0])
    leak = {"pairs": [{"train_id": int(a), "eval_id": ev, "split": "test", "distance": 0.0}]}
    (p["flags"].parent / "issues.json").write_text(json.dumps(
        {"duplicate": {"n": 2, "rule": "copies", "copy_ratio": 0.1, "d_exact": 0.002, "leakage": leak,
                       "cut": 0.2756804543264329, "exact": True}}))
    _build(p, tmp_path / "rep")
    text, parsed = _parse(tmp_path / "rep" / "index.html")
    # the facts table: floats to 4 significant digits, other values as they are
    assert "copies; copy_ratio 0.1; d_exact 0.002; cut 0.2757; exact True" in text
    assert "0.27568" not in text
    assert f"a copy of #{a}, the one kept; aligned pixel distance 0.001 ≤ cut 0.004 (0.1 × what the two" in text
    assert f"a copy of #{a}, the one kept; the same pixels" in text
    assert "a test image of the set (leakage)" in text and f"data-sample='{ev}'" in text
    assert re.search(r"title=.group 0[^']* · leakage", text)
