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


def test_relabel_agree_relabels_only_where_the_two_views_agree_and_leaves_the_rest_alone(tmp_path):
    """relabel-agree: a label issue whose suggestion equals its kNN vote and has p̄ ≥ relabel_min_p
    is relabelled; a label issue without agreement (or unsure) keeps its label and its row; the
    other prune.drop types are dropped; val/test rows of flags.csv are ignored."""
    import numpy as np
    import pandas as pd

    from pipeline.stages.prepare import prepare
    from pipeline.stages.prune import prune

    from .helpers import make_imagefolder

    make_imagefolder(tmp_path / "imgs", n_per_class=10)
    prepare(tmp_path / "data", PrepareConfig(source="imagefolder", root=str(tmp_path / "imgs"), val_frac=0.1,
                                             test_frac=0.2, seed=0))
    man = pd.read_csv(tmp_path / "data/manifest.csv")
    tr = man[man["split"] == "train"].reset_index(drop=True)
    n = len(tr)
    tr[["id", "path", "label"]].assign(pred=tr["label"], loss=0.0, grad_norm=1.0).to_csv(tmp_path / "scores.csv",
                                                                                        index=False)
    y = tr["label"].to_numpy()
    is_label = np.zeros(n, int)
    is_label[:4] = 1
    sug = (y + 1) % 3
    knn = sug.copy()
    knn[1] = y[1]  # no agreement: left alone
    sp = np.array([0.9, 0.9, 0.3, 0.8] + [0.5] * (n - 4))  # id 2: agreement but unsure
    outlier = np.zeros(n, int)
    outlier[5] = 1
    fl = pd.DataFrame({"id": tr["id"], "flagged": is_label, "rule": "r", "value": 0.0, "is_label": is_label,
                       "label_score": 0.5, "is_outlier": outlier, "outlier_score": 0.0, "suggested_label": sug,
                       "suggested_p": sp, "knn_label": knn, "knn_share": 0.8, "split": "train"})
    held = man[man["split"] != "train"]
    fl = pd.concat([fl, pd.DataFrame({"id": held["id"], "flagged": 0, "rule": "h", "value": 0.9, "is_label": 1,
                                      "label_score": 0.9, "is_outlier": 0, "suggested_label": 0, "split": held["split"]})])
    fl.to_csv(tmp_path / "flags.csv", index=False)
    s = prune(tmp_path / "data/manifest.csv", tmp_path / "scores.csv", tmp_path / "data/ra.csv", tmp_path / "s.json",
              PruneConfig(strategy="relabel-agree", relabel_min_p=0.5, drop=["label", "outlier"]),
              flags_csv=tmp_path / "flags.csv")
    out = pd.read_csv(tmp_path / "data/ra.csv").set_index("id")
    ids = tr["id"].to_numpy()
    assert s["n_kept"] == n - 1 and ids[5] not in out.index
    assert out.loc[ids[0], "label"] == sug[0] and out.loc[ids[3], "label"] == sug[3]
    assert out.loc[ids[1], "label"] == y[1] and out.loc[ids[2], "label"] == y[2]  # left alone, kept
    rest = np.delete(np.arange(4, n), 1)
    assert (out.loc[ids[rest], "label"].to_numpy() == y[rest]).all()
    pd.testing.assert_frame_equal(out.loc[held["id"], ["path", "label", "split"]].reset_index(drop=True),
                                  held[["path", "label", "split"]].reset_index(drop=True))


def test_knn_vote_is_the_majority_label_of_the_k_nearest_other_embeddings():
    """knn_vote against a brute-force cosine kNN (self excluded) in numpy."""
    import numpy as np

    from pipeline.rules.labels import knn_vote

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(300, 16)).astype(np.float32)
    labels = rng.integers(0, 4, 300)
    vote, share = knn_vote(emb, labels, 7)
    u = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = u @ u.T
    np.fill_diagonal(sim, -np.inf)
    nn = np.argsort(-sim, axis=1)[:, :7]
    for i in range(300):
        c = np.bincount(labels[nn[i]], minlength=4)
        assert vote[i] == c.argmax() and share[i] == c.max() / 7
