"""Label remedies: relabel and relabel-or-drop write label overrides that retraining uses."""
from pipeline.config import PrepareConfig, PruneConfig


def test_relabel_strategies_write_label_overrides_and_retrain_uses_them(tmp_path):
    """relabel: every label issue keeps its row with label = suggested_label, orig_label = before;
    relabel-or-drop: only confident suggestions are relabelled, the rest of the flagged set dropped."""
    import numpy as np
    import pandas as pd

    from pipeline.data.dataset import load_split
    from pipeline.stages.prepare import prepare
    from pipeline.stages.prune import prune

    from .helpers import make_imagefolder

    make_imagefolder(tmp_path / "imgs", n_per_class=10)
    prepare(tmp_path / "data",
            PrepareConfig(source="imagefolder", root=str(tmp_path / "imgs"), val_frac=0.1, test_frac=0.2, seed=0))
    man = pd.read_csv(tmp_path / "data/manifest.csv")
    tr = man[man["split"] == "train"].reset_index(drop=True)
    n = len(tr)
    scores = tr[["id", "path", "label"]].assign(pred=tr["label"], loss=np.linspace(0, 1, n), grad_norm=1.0)
    scores.to_csv(tmp_path / "scores.csv", index=False)
    is_label = np.zeros(n, int)
    is_label[:4] = 1
    suggested = (tr["label"].to_numpy() + 1) % 3
    sp = np.array([0.9, 0.2, 0.7, 0.4] + [0.5] * (n - 4))
    pd.DataFrame({"id": tr["id"], "flagged": is_label, "rule": "r", "value": 0.0, "is_label": is_label,
                  "label_score": 0.5, "suggested_label": suggested, "suggested_p": sp}).to_csv(tmp_path / "flags.csv",
                                                                                              index=False)
    common = dict(flags_csv=tmp_path / "flags.csv")
    s = prune(tmp_path / "data/manifest.csv", tmp_path / "scores.csv", tmp_path / "data/relabel.csv",
              tmp_path / "s1.json", PruneConfig(strategy="relabel", drop=["label"]), **common)
    out = pd.read_csv(tmp_path / "data/relabel.csv").set_index("id")
    ids = tr["id"].to_numpy()
    assert s["n_kept"] == n and set(out.index) == set(man["id"])
    assert (out.loc[ids[:4], "label"].to_numpy() == suggested[:4]).all()
    assert (out.loc[ids[:4], "orig_label"].to_numpy() == tr["label"].to_numpy()[:4]).all()
    assert (out.loc[ids[4:], "label"] == out.loc[ids[4:], "orig_label"]).all()
    # retraining reads the overridden labels
    split = load_split(tmp_path / "data/relabel.csv", "train")
    got = dict(zip(split.ids.tolist(), split.labels.tolist()))
    assert [got[i] for i in ids[:4]] == suggested[:4].tolist()

    prune(tmp_path / "data/manifest.csv", tmp_path / "scores.csv", tmp_path / "data/rod.csv", tmp_path / "s2.json",
          PruneConfig(strategy="relabel-or-drop", relabel_min_p=0.6, drop=["label"]), **common)
    rod = pd.read_csv(tmp_path / "data/rod.csv").set_index("id")
    assert ids[1] not in rod.index and ids[3] not in rod.index  # p̄ 0.2, 0.4 < 0.6: dropped
    assert rod.loc[ids[0], "label"] == suggested[0] and rod.loc[ids[2], "label"] == suggested[2]
    assert len(rod[rod["split"] == "train"]) == n - 2
