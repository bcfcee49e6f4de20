"""Every entry of every registry runs on a tiny input and returns its documented shape.

One calling form per registry (pipeline/registry.py CALLING), tested over the registered names
(as timm's ``parametrize('name', list_models())``): a new entry is tested the moment it is
registered. The tiny input: 24 8×8 images (3 classes, val/test 0.2), a small CNN trained for 2
epochs (2 checkpoints), scored and flagged once per module.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import FlagConfig, PruneConfig, Recipe, ScoreConfig
from pipeline.data.sources import Record, Source
from pipeline.data.stream import open_split
from pipeline.formats.tables import read_scores
from pipeline.models import load_trained
from pipeline.registry import CALLING, ISSUES, RULES, SCORES, SOURCES, STRATEGIES, TABLES
from pipeline.rules.base import FlagResult, IssueResult, RuleInputs
from pipeline.scores.inputs import ScoreInputs
from pipeline.strategies import PruneInputs, PruneResult

from .helpers import make_imagefolder, prepared_folder

RECIPE = Recipe(model="small_cnn", epochs=2, batch_size=8, device="cpu", checkpoint_every=1, track=0, workers=0)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """root with data/manifest.csv, models/base (2 checkpoints, dynamics), scores/ (scores.csv,
    embeddings.npz, flags.csv)."""
    from pipeline.stages.flag import flag
    from pipeline.stages.score import score
    from pipeline.stages.train import train

    root = prepared_folder(tmp_path_factory.mktemp("registry"), n_per_class=8)
    train(root / "data/manifest.csv", root / "models/base", RECIPE, seeds=[0])
    score(root / "models/base", root / "data/manifest.csv", root / "scores",
          ScoreConfig(subset="last", batch_size=16, device="cpu", workers=0))
    flag(root / "scores/scores.csv", root / "scores", FlagConfig(grid=0, device="cpu"), model_dir=root / "models/base",
         manifest=root / "data/manifest.csv")
    return root


def test_every_registry_has_entries_and_one_calling_form():
    assert set(CALLING) == set(TABLES)
    for reg in (SCORES, RULES, ISSUES, STRATEGIES, SOURCES):
        assert len(reg) > 0 and all(e.fn is not None and e.doc for e in reg.entries()), reg.concept


@pytest.mark.parametrize("name", SCORES.names())
def test_score_entry(project, name):
    """fn(ScoreInputs, ScoreConfig) → {column: float [N]} holding the entry's own column."""
    model, cfg = load_trained(project / "models/base", "cpu")
    manifest = project / "data/manifest.csv"
    tr = open_split(manifest, "train", cfg["image_size"], cfg["in_chans"])
    val = open_split(manifest, "val", cfg["image_size"], cfg["in_chans"])
    ckpts = [(project / "models/base/checkpoints" / c["file"], float(c["lr"])) for c in cfg["checkpoints"]]
    assert len(ckpts) == 2
    inputs = ScoreInputs(model, tr.images, tr.labels, tr.ids, cfg["mean"], cfg["std"], project / "models/base", "cpu",
                         None, ckpts, ckpts, val)
    out = SCORES[name].fn(inputs, ScoreConfig(subset="last", batch_size=16, device="cpu"))
    col = np.asarray(out[name])
    assert col.shape == (len(tr.labels),) and col.dtype.kind == "f"
    assert np.isfinite(col).all()  # every training sample has a value (dynamics: all were trained on)
    extras = SCORES[name].extra.get("extras", ())  # declared side outputs (e.g. attribution.npz), not columns
    assert all(np.asarray(v).shape[0] == len(tr.labels) for k, v in out.items() if k not in extras)
    assert set(extras) <= set(out), f"{name} declares extras {extras} but returned {sorted(out)}"
    if name in ("grad_norm", "self_influence"):
        assert (col >= 0).all()


def _rule_inputs(project):
    scores_csv = project / "scores/scores.csv"
    return RuleInputs(read_scores(scores_csv), scores_csv, project / "models/base", project / "data/manifest.csv",
                      RECIPE, "cpu")


@pytest.mark.parametrize("name", RULES.names())
def test_rule_entry(project, name):
    """fn(RuleInputs, FlagConfig) → FlagResult: flagged bool [N], value float [N], a rule text."""
    inputs = _rule_inputs(project)
    res = RULES[name].fn(inputs, FlagConfig(method=name, score="loss", folds=2, projection_dim=16, grid=0))
    n = len(inputs.ids)
    assert isinstance(res, FlagResult) and res.rule
    assert np.asarray(res.flagged).shape == (n,) and np.asarray(res.flagged).dtype == bool
    assert np.asarray(res.value, float).shape == (n,)


@pytest.mark.parametrize("name", ISSUES.names())
def test_issue_entry(project, name):
    """fn(RuleInputs, FlagConfig) → IssueResult: flagged bool [N], score float [N], extra
    per-sample columns [N] and a JSON summary."""
    inputs = _rule_inputs(project)
    res = ISSUES[name].fn(inputs, FlagConfig(grid=0))
    n = len(inputs.ids)
    assert isinstance(res, IssueResult) and res.rule
    assert np.asarray(res.flagged).shape == (n,) and np.asarray(res.flagged).dtype == bool
    assert np.asarray(res.score, float).shape == (n,)
    assert all(np.asarray(v).shape == (n,) for v in res.columns.values())
    json.dumps(res.summary)


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_strategy_entry(project, name):
    """fn(PruneInputs) → PruneResult: kept bool [N] (some kept), labels int [N], summary facts."""
    import pandas as pd

    manifest = pd.read_csv(project / "data/manifest.csv")
    train = manifest[manifest["split"] == "train"]
    ids, labels = train["id"].to_numpy(), train["label"].to_numpy(np.int64)
    sc = read_scores(project / "scores/scores.csv").set_index("id").loc[ids]
    config = PruneConfig(strategy=name, keep=0.5, drop=["label"])
    inputs = PruneInputs(labels, config, scores=sc, scores_csv=project / "scores/scores.csv",
                         flags_csv=project / "scores/flags.csv", ids=ids)
    res = STRATEGIES[name].fn(inputs)
    assert isinstance(res, PruneResult)
    assert res.kept.shape == (len(ids),) and res.kept.dtype == bool and res.kept.any()
    assert res.labels.shape == (len(ids),) and res.labels.dtype.kind == "i"
    assert {"drop", "by", "keep", "skip"} <= set(res.facts)
    if "score" in STRATEGIES[name].needs or name == "random":
        assert res.kept.sum() == round(0.5 * len(ids))
    if not name.startswith("relabel"):
        np.testing.assert_array_equal(res.labels, labels)  # only the relabel remedies change labels


@pytest.fixture
def source_roots(tmp_path, fashion_dir):
    folder = make_imagefolder(tmp_path / "folder", n_per_class=3)
    rows = ["path,label"] + [f"{p},{p.parent.name}" for p in sorted(folder.rglob("*.png"))]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    return {"digits": None, "fashion-mnist": str(fashion_dir), "imagefolder": str(folder),
            "csv": str(tmp_path / "list.csv")}


@pytest.mark.parametrize("name", SOURCES.names())
def test_source_entry(name, source_roots, tmp_path):
    """fn(root, out_dir, classes, progress) → Source: readable records with labels from its classes."""
    if name not in source_roots:
        pytest.fail(f"add a tiny root for the new data source {name!r} to source_roots")
    src = SOURCES[name].fn(source_roots[name], tmp_path / "out", None, None)
    assert isinstance(src, Source) and src.records and len(set(src.classes)) == len(src.classes) >= 2
    assert all(isinstance(r, Record) and r.label in src.classes for r in src.records)
