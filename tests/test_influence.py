"""val_influence (TracIn train → validation) against a per-sample loop in float64, the score
stage's column, the `harmful` issue type and the drop-harmful / drop-flagged-harmful strategies."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.config import FlagConfig, PrepareConfig, PruneConfig, ScoreConfig
from pipeline.errors import CleanError
from pipeline.scores.influence import grad_dots, val_gradient, val_influence
from pipeline.scores.layers import param_subset
from pipeline.training.infer import normalize

from .test_gradnorm import randomize_norm_layers
from .helpers import make_imagefolder

MEAN, STD = (0.45,), (0.27,)


def _checkpoints(model: nn.Module, tmp_path, lrs=(0.1, 0.03)):
    """Two checkpoints (float32 safetensors) with different weights and BN statistics."""
    from safetensors.torch import save_file

    out = []
    for k, lr in enumerate(lrs):
        torch.manual_seed(10 + k)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        randomize_norm_layers(model, k)
        path = tmp_path / f"epoch_{k + 1:03d}.safetensors"
        save_file({n: t.detach().float().contiguous() for n, t in model.state_dict().items()}, str(path))
        out.append((path, lr))
    return out


def _reference(model: nn.Module, ckpts, x, y, xv, yv, subset: str) -> np.ndarray:
    """Σ_c lr_c ⟨∇L_i, ∇L̄_val⟩ by a per-sample loop of backward passes (float64)."""
    from pipeline.models import load_weights

    total = np.zeros(len(y))
    for path, lr in ckpts:
        load_weights(model, path)
        model.eval()
        names = param_subset(model, subset)
        params = list(names.values())
        v = torch.autograd.grad(F.cross_entropy(model(xv), yv), params)
        for i in range(len(y)):
            g = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
            total[i] += lr * sum((a * b).sum() for a, b in zip(g, v)).item()
    return total


def _images(n, chw, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, *chw), dtype=np.uint8)


def _check(model, ckpts, chw, n_cls, subsets, mean, std):
    x8, xv8 = _images(7, chw, 0), _images(5, chw, 1)
    y, yv = np.arange(7) % n_cls, (np.arange(5) + 1) % n_cls
    x = normalize(x8, mean, std).double()
    xv = normalize(xv8, mean, std).double()
    for subset in subsets:
        got = val_influence(model, ckpts, x8, y, xv8, yv, mean, std, params=subset, batch_size=3)
        ref = _reference(model, ckpts, x, torch.as_tensor(y), xv, torch.as_tensor(yv), subset)
        assert np.abs(ref).max() > 1e-6, subset  # a real test, not 0 == 0
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-10 * np.abs(ref).max(), err_msg=subset)


def test_small_cnn_bn_equals_the_per_sample_loop(tmp_path):
    from pipeline.nets import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN(num_classes=3, in_chans=1, img_size=8, batch_norm=True).double().eval()
    ckpts = _checkpoints(model, tmp_path)
    _check(model, ckpts, (1, 8, 8), 3, ("last", "all", "weights", "biases"), MEAN, STD)


def test_timm_resnet18_equals_the_per_sample_loop(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=4, in_chans=3).double().eval()
    ckpts = _checkpoints(model, tmp_path)
    _check(model, ckpts, (3, 16, 16), 4, ("last", "all"), (0.5, 0.4, 0.45), (0.25, 0.3, 0.2))


def test_last_closed_form_equals_jvp_on_the_head():
    """The head identity r_iᵀ G_W h_i + r_i·g_b and forward-mode jvp agree (same v)."""
    from pipeline.nets import SmallCNN

    torch.manual_seed(1)
    model = SmallCNN(num_classes=3, in_chans=1, img_size=8, batch_norm=True).double().eval()
    randomize_norm_layers(model, 3)
    x, xv = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randn(5, 1, 8, 8, dtype=torch.float64)
    y, yv = torch.arange(6) % 3, torch.arange(5) % 3
    v_closed = val_gradient(model, [(xv[:2], yv[:2]), (xv[2:], yv[2:])], "last")
    v_auto = dict(zip(param_subset(model, "last"), torch.autograd.grad(
        F.cross_entropy(model(xv), yv), list(param_subset(model, "last").values()))))
    for k in v_auto:
        torch.testing.assert_close(v_closed[k], v_auto[k], rtol=1e-10, atol=1e-12)
    closed = grad_dots(model, x, y, v_closed, "last")
    jvp = grad_dots(model, x, y, v_closed, "all")  # "all" path with v only on the head = jvp on the head
    torch.testing.assert_close(closed, jvp, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- the stages
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from pipeline.stages.prepare import prepare
    from pipeline.stages.train import train
    from pipeline.training.recipe import Recipe

    root = tmp_path_factory.mktemp("influence")
    make_imagefolder(root / "imgs", n_per_class=10)
    prepare(root / "data",
            PrepareConfig(source="imagefolder", root=str(root / "imgs"), val_frac=0.2, test_frac=0.2, seed=0,
                          noise_rate=0.2))
    recipe = Recipe(model="small_cnn_bn", epochs=2, batch_size=8, lr=1e-2, device="cpu", seed=0, checkpoint_every=1)
    train(root / "data" / "manifest.csv", root / "models" / "base", recipe)
    return root


@pytest.fixture(scope="module")
def scored(trained):
    from pipeline.stages.score import score

    df = score(trained / "models/base", trained / "data/manifest.csv", trained / "scores",
               ScoreConfig(subset="all", batch_size=5, device="cpu", embeddings=False))
    return trained, df


def test_score_stage_writes_the_val_influence_column(scored):
    from pipeline.data.dataset import load_split
    from pipeline.models import load_trained
    from pipeline.stages.score import columns

    root, df = scored
    cols = list(pd.read_csv(root / "scores/scores.csv").columns)
    assert cols[:len(columns())] == columns()
    assert cols.index("val_influence") == cols.index("self_influence") + 1
    assert df["val_influence"].notna().all() and (df["val_influence"] != 0).any()
    meta = json.loads((root / "scores/meta.json").read_text())
    assert meta["val_influence"]["computed"] and meta["val_influence"]["params"] == "all"
    assert [c["file"] for c in meta["val_influence"]["checkpoints"]] == ["epoch_001.safetensors",
                                                                         "epoch_002.safetensors"]
    # equals the library function on the same data (and does not depend on the batch size)
    model, cfg = load_trained(root / "models/base")
    tr = load_split(root / "data/manifest.csv", "train", cfg["image_size"])
    va = load_split(root / "data/manifest.csv", "val", cfg["image_size"])
    ckpts = [(root / "models/base/checkpoints" / c["file"], c["lr"]) for c in cfg["checkpoints"]]
    # against the trusted reference: the validation rows that are not label issues (heldout_label_issues)
    from pipeline.rules.labels import heldout_label_issues
    from pipeline.scores.attribution import val_probs

    issue, _, _ = heldout_label_issues(va.labels, val_probs(model, va.images, va.labels, cfg["mean"], cfg["std"], 64,
                                                            "cpu"))
    ref = ~issue
    assert meta["val_influence"]["n_reference"] == int(ref.sum()) and meta["val_influence"]["n_val"] == len(ref)
    direct = val_influence(model, ckpts, tr.images, tr.labels, va.images[ref], va.labels[ref], cfg["mean"], cfg["std"],
                           "all", batch_size=64)
    order = pd.Series(np.arange(len(tr.ids)), index=tr.ids).loc[df["id"]].to_numpy()
    np.testing.assert_allclose(df["val_influence"], direct[order], rtol=1e-4, atol=1e-7)


def test_a_manifest_without_val_is_a_clear_error(trained, tmp_path):
    from pipeline.stages.prepare import prepare
    from pipeline.stages.score import score

    prepare(tmp_path / "d",
            PrepareConfig(source="imagefolder", root=str(trained / "imgs"), val_frac=0.0, test_frac=0.2, seed=0))
    match = r"no 'val' rows.*data\.val_frac > 0.*score\.val_influence: false.*score\.importance: false"
    for vi, imp in ((True, False), (False, True)):
        with pytest.raises(CleanError, match=match):
            score(trained / "models/base", tmp_path / "d/manifest.csv", tmp_path / "s",
                  ScoreConfig(subset="last", self_influence=False, val_influence=vi, importance=imp, device="cpu",
                              embeddings=False))
    df = score(trained / "models/base", tmp_path / "d/manifest.csv", tmp_path / "s",
               ScoreConfig(subset="last", self_influence=False, val_influence=False, importance=False, device="cpu",
                           embeddings=False))
    assert df["val_influence"].isna().all() and df["importance"].isna().all()
    assert np.load(tmp_path / "s/attribution.npz")["effects"].shape == (0, len(df))


def test_harmful_issue_type_and_its_skip(scored, tmp_path):
    from pipeline.stages.flag import flag

    root, df = scored
    flag(root / "scores/scores.csv", root / "scores", model_dir=root / "models/base",
         manifest=root / "data/manifest.csv")
    fl = pd.read_csv(root / "scores/flags.csv").set_index("id").loc[df["id"]]
    a = np.load(root / "scores/attribution.npz")
    eff = a["effects"][:, pd.Series(np.arange(len(a["ids"])), index=a["ids"]).loc[df["id"]].to_numpy()]
    ratio = -eff.mean(0) * eff.shape[1] / a["val_loss"].mean()  # × the image's share L̄/N
    e = eff.mean(0)
    from pipeline.rules.influence import NULL_QUANTILE

    want = (eff < 0).all(0) & (-e > np.quantile(e[e > 0], NULL_QUANTILE))  # beyond the helpful side's quantile
    assert fl["is_harmful"].tolist() == want.astype(int).tolist()
    np.testing.assert_allclose(fl["harmful_score"], np.round(ratio, 6), atol=1e-6)
    np.testing.assert_allclose(df["importance"], eff.mean(0), rtol=1e-6)
    issues = json.loads((root / "scores/issues.json").read_text())
    assert issues["harmful"]["n"] == int(want.sum()) and f"helpful images' {NULL_QUANTILE:g} quantile" in issues["harmful"]["rule"]
    # scores without importance values: the type is skipped, and said so
    nov = tmp_path / "s"
    nov.mkdir()
    df.assign(importance=np.nan).to_csv(nov / "scores.csv", index=False)
    flag(nov / "scores.csv", nov, model_dir=root / "models/base", manifest=root / "data/manifest.csv")
    assert "is_harmful" not in pd.read_csv(nov / "flags.csv").columns
    assert "importance" in json.loads((nov / "issues.json").read_text())["harmful"]["skipped"]
    # asked for explicitly: a clear error naming the missing attribution
    with pytest.raises(CleanError, match="no attribution.*score.importance: true"):
        flag(nov / "scores.csv", nov, FlagConfig(issues=["harmful"]), model_dir=root / "models/base",
             manifest=root / "data/manifest.csv")


def test_drop_harmful_and_drop_flagged_harmful(scored, tmp_path):
    from pipeline.stages.flag import flag
    from pipeline.stages.prune import prune

    root, df = scored
    flag(root / "scores/scores.csv", tmp_path, model_dir=root / "models/base", manifest=root / "data/manifest.csv")
    fl = pd.read_csv(tmp_path / "flags.csv")
    rng = np.random.default_rng(0)
    fl["is_label"] = rng.integers(0, 2, len(fl))  # a known label-issue set for the intersection
    fl["is_harmful"] = rng.integers(0, 2, len(fl))  # and a known harmful set (the rule is tested above)
    fl.to_csv(tmp_path / "flags.csv", index=False)
    fl = fl[fl["split"] == "train"] if "split" in fl.columns else fl  # prune reads the training rows
    harmful = fl["is_harmful"].to_numpy().astype(bool)
    both = harmful & fl["is_label"].to_numpy().astype(bool)
    assert harmful.any() and 0 < both.sum() < harmful.sum()
    man = pd.read_csv(root / "data/manifest.csv")
    for strategy, drop in (("drop-harmful", harmful), ("drop-flagged-harmful", both)):
        out = tmp_path / f"{strategy}.csv"
        summ = prune(root / "data/manifest.csv", root / "scores/scores.csv", out, tmp_path / f"{strategy}.json",
                     PruneConfig(strategy=strategy), flags_csv=tmp_path / "flags.csv")
        kept = pd.read_csv(out)
        assert set(kept[kept["split"] == "train"]["id"]) == set(fl["id"][~drop])
        assert (kept["split"] != "train").sum() == (man["split"] != "train").sum()  # val/test untouched
        assert summ["n_kept"] == int((~drop).sum())
    # flags without is_harmful (harmful skipped): a clear error
    fl.drop(columns=["is_harmful", "harmful_score"]).to_csv(tmp_path / "old.csv", index=False)
    with pytest.raises(CleanError, match="needs is_harmful.*score.importance: true"):
        prune(root / "data/manifest.csv", root / "scores/scores.csv", tmp_path / "x.csv", tmp_path / "x.json",
              PruneConfig(strategy="drop-harmful"), flags_csv=tmp_path / "old.csv")


def test_select_with_the_harm_strategies():
    from pipeline.strategies import select

    flagged = np.array([True, False, True, False])
    for s in ("drop-harmful", "drop-flagged-harmful"):
        assert select(np.zeros(4), np.zeros(4, int), s, 1.0, 0, flagged=flagged).tolist() == [1, 3]
        with pytest.raises(CleanError, match="would keep 0 of 4"):
            select(np.zeros(4), np.zeros(4, int), s, 1.0, 0, flagged=np.ones(4, bool))
        with pytest.raises(CleanError, match="needs the flag stage"):
            select(np.zeros(4), np.zeros(4, int), s, 1.0, 0)


def test_the_report_and_the_reference_state_the_harmful_cut_in_use():
    """The report's importance note and docs/reference.md say the quantile harmful_mask uses."""
    from pathlib import Path

    from pipeline.rules.influence import NULL_QUANTILE

    root = Path(__file__).resolve().parents[1]
    said = f"{100 * NULL_QUANTILE:g} % of the helpful images' predicted help"
    for f in ("pipeline/views/report.py", "docs/reference.md"):
        assert said in (root / f).read_text(encoding="utf-8"), f


def test_drop_flagged_gated_drops_the_label_issues_every_model_calls_harmful(scored, tmp_path):
    """drop-flagged-gated drops (is_label ∧ every model's effect < 0) ∨ the other prune.drop types,
    reading the effects from attribution.npz beside scores.csv; no attribution: a clear error."""
    import shutil

    from pipeline.stages.flag import flag
    from pipeline.stages.prune import prune

    root, _ = scored
    flag(root / "scores/scores.csv", tmp_path, model_dir=root / "models/base", manifest=root / "data/manifest.csv")
    fl = pd.read_csv(tmp_path / "flags.csv")
    tr = fl[fl["split"] == "train"] if "split" in fl.columns else fl
    n, rng = len(tr), np.random.default_rng(1)
    is_label, is_outlier = rng.random(n) < 0.5, rng.random(n) < 0.2
    fl["is_label"], fl["is_outlier"] = 0, 0
    fl.loc[tr.index, "is_label"], fl.loc[tr.index, "is_outlier"] = is_label.astype(int), is_outlier.astype(int)
    fl.to_csv(tmp_path / "flags.csv", index=False)
    effects = rng.normal(size=(3, n))  # known per-model effects: some all < 0, some mixed
    shutil.copy(root / "scores/scores.csv", tmp_path / "scores.csv")
    np.savez(tmp_path / "attribution.npz", ids=tr["id"].to_numpy()[::-1], effects=effects[:, ::-1],
             val_ids=np.zeros(0, np.int64), val_loss=np.zeros((3, 0)), calibration=np.ones(3))
    harm = (effects < 0).all(0)
    assert (is_label & harm).any() and (is_label & ~harm).any()
    out = tmp_path / "gated.csv"
    summ = prune(root / "data/manifest.csv", tmp_path / "scores.csv", out, tmp_path / "gated.json",
                 PruneConfig(strategy="drop-flagged-gated", drop=["label", "outlier"]), flags_csv=tmp_path / "flags.csv")
    kept = pd.read_csv(out)
    drop = (is_label & harm) | is_outlier
    assert set(kept[kept["split"] == "train"]["id"]) == set(tr["id"][~drop])
    assert summ["n_kept"] == int((~drop).sum()) and summ["drop"] == ["label", "outlier"]
    assert summ["label_gate"]["dropped"] == int((is_label & harm).sum())
    assert summ["label_gate"]["kept"] == int((is_label & ~harm).sum())
    from pipeline.views.report import _pruned

    html = _pruned(summ, tmp_path / "gated.json")  # the report says what the gate did
    assert (f"drop-flagged-gated: {int((is_label & harm).sum())} of {int(is_label.sum())} label issues dropped, "
            f"{int((is_label & ~harm).sum())} kept (every seed model&#x27;s removal effect &lt; 0)") in html
    # effects of other ids (a stale attribution file): one clear error, nothing written
    np.savez(tmp_path / "attribution.npz", ids=tr["id"].to_numpy() + 10_000, effects=effects,
             val_ids=np.zeros(0, np.int64), val_loss=np.zeros((3, 0)), calibration=np.ones(3))
    with pytest.raises(CleanError, match="attribution.npz has no attribution for training id.*rerun `clean score`"):
        prune(root / "data/manifest.csv", tmp_path / "scores.csv", tmp_path / "y.csv", tmp_path / "y.json",
              PruneConfig(strategy="drop-flagged-gated"), flags_csv=tmp_path / "flags.csv")
    assert not (tmp_path / "y.csv").exists() and not (tmp_path / "y.json").exists()
    # no effects (score.importance false, no val split): every label issue dropped, and the summary says why
    (tmp_path / "attribution.npz").unlink()
    summ = prune(root / "data/manifest.csv", tmp_path / "scores.csv", tmp_path / "x.csv", tmp_path / "x.json",
                 PruneConfig(strategy="drop-flagged-gated"), flags_csv=tmp_path / "flags.csv")
    assert summ["n_kept"] == int((~is_label).sum())
    assert summ["label_gate"]["rule"].startswith("off") and "score.importance: true" in summ["label_gate"]["rule"]
