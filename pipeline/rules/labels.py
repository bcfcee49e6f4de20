"""The `label` issue type: label errors found by the flag rule `flag.method` (default
confident-dynamics), with a suggested label per sample (docs/methods.md §2)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import CleanError
from pipeline.config import FlagConfig
from pipeline.formats.manifest import read_manifest
from pipeline.registry import ISSUES
from pipeline.rules.base import IssueResult
from pipeline.rules.confident import NOISE_POSTERIOR, flag_confident


@ISSUES.register("label", doc="label errors: the flag.method rule; suggested_label = argmax of p̄ "
                              "(the epoch- and seed-averaged softmax) or the model's prediction")
def label_issue(inputs, cfg: FlagConfig) -> IssueResult:
    """is_label = the flag.method rule's flags; label_score = its value (confident rules: 1 − label
    quality, in 0..1); suggested_label / suggested_p = argmax and max of p̄ when the model's
    training record has it, else the final model's prediction (pred) with NaN confidence."""
    res = inputs.rule_result(cfg)
    try:
        probs = inputs.probs() if inputs.model_dir is not None else None
    except CleanError:
        probs = None
    if probs is not None:
        suggested, p = probs.argmax(1).astype(np.int64), probs.max(1)
    else:
        suggested, p = inputs.scores["pred"].to_numpy(np.int64), np.full(len(inputs.ids), np.nan)
    same = int((res.flagged & (suggested == inputs.labels)).sum())
    columns = {"suggested_label": suggested, "suggested_p": np.round(p, 6)}
    summary = {"n_suggestion_equals_label": same}
    emb = Path(inputs.scores_csv).parent / "embeddings.npz"
    if emb.exists():  # a second view: the labels of the image's nearest training neighbours
        f = inputs.features()
        vote, share = knn_vote(f["emb"][f["train_pos"]], inputs.labels, cfg.outlier_k)
        columns.update(knn_label=vote, knn_share=np.round(share, 6))
        summary["n_views_agree"] = int((res.flagged & (vote == suggested) & (suggested != inputs.labels)).sum())
    return IssueResult(res.flagged, np.asarray(res.value, np.float64), res.rule, columns=columns, summary=summary)


def knn_vote(emb, labels, k: int) -> tuple[np.ndarray, np.ndarray]:
    """kNN label voting (cleanlab Datalab's features path): each training image's k nearest other
    training images by cosine similarity of the L2-normalised embeddings `emb` [N, D] (faiss,
    pipeline/rules/knn.py) → (knn_label int [N] = their most common given label, lowest class on
    ties; knn_share float [N] = its share of the k votes, in 0..1)."""
    from pipeline.rules.knn import build_index, normalize, search

    labels = np.asarray(labels, np.int64)
    v = normalize(emb)
    k = int(min(k, len(v) - 1))
    if k < 1:
        return labels.copy(), np.ones(len(labels))
    index, _ = build_index(v)
    _, nn = search(index, v, k + 1)
    own = nn == np.arange(len(v))[:, None]  # drop the image itself (or, for exact copies, the last neighbour)
    drop = np.where(own.any(1), own.argmax(1), k)
    keep = np.ones_like(nn, bool)
    keep[np.arange(len(v)), drop] = False
    nn = nn[keep].reshape(len(v), k)
    valid = nn >= 0
    counts = np.zeros((len(v), int(labels.max()) + 1))
    rows = np.repeat(np.arange(len(v)), k)[valid.ravel()]
    np.add.at(counts, (rows, labels[nn[valid]]), 1.0)
    return counts.argmax(1).astype(np.int64), counts.max(1) / np.maximum(valid.sum(1), 1)


def heldout_label_issues(labels, probs, filter_by: str = "prune_by_noise_rate", noise_matrix=None):
    """Label issues of held-out images (val/test: the trained model never saw them, so its
    predictions there are out-of-sample and confident learning applies without k-fold).

    labels: int [N] in [0, C); probs: float [N, C] softmax rows (eval mode, out-of-sample).
    Returns (is_issue bool [N] = cleanlab.filter.find_label_issues(labels, probs, filter_by),
    suggested int [N] = argmax of probs, quality float [N] in 0..1 = cleanlab's self-confidence
    label quality; low = likely wrong). CleanError on bad shapes / non-probabilities.
    filter_by "noise_posterior": is_issue and quality (= 1 − P(wrong)) from
    pipeline.rules.confident.noise_posterior with `noise_matrix` [C, C] (None: estimated from probs).
    """

    res = flag_confident(probs, labels, filter_by=filter_by, noise_matrix=noise_matrix)
    suggested = np.asarray(probs, dtype=float).argmax(1).astype(np.int64)
    return res.flagged, suggested, 1.0 - res.value


#: the filter that decides which validation rows attribution trusts (:func:`reference_rows`), whatever
#: flag.heldout_filter_by says: recall matters there (a wrong label left in the reference rewards learning it),
#: and cleanlab's prune_by_noise_rate finds 0.88–0.90 of the planted val flips against noise_posterior's 0.76–0.87
REFERENCE_FILTER = "prune_by_noise_rate"


def reference_rows(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """bool [V]: the validation rows trusted as the target of attribution — those that are not
    label issues per :func:`heldout_label_issues` with REFERENCE_FILTER (out-of-sample probabilities [V, C])."""
    if len(np.unique(labels)) < 2:  # confident learning needs two classes: every row is trusted
        return np.ones(len(labels), bool)
    is_issue, _, _ = heldout_label_issues(np.asarray(labels, np.int64), np.asarray(probs, np.float64),
                                         REFERENCE_FILTER)
    keep = ~np.asarray(is_issue, bool)
    return keep if keep.any() else np.ones(len(keep), bool)


#: the splits the trained model never saw: their predictions are out-of-sample
HELDOUT_SPLITS = ("val", "test")


def heldout_probs(model_dir, manifest, split: str, device: str = "cpu", df=None):
    """Eval-mode softmax on `split` of `manifest`, averaged over every seed's model of
    `model_dir` (models/base and its seeds/) → (ids int [M], labels int [M], probs float64 [M, C])."""
    import torch

    from pipeline.data.dataset import load_split
    from pipeline.models import load_trained, run_dirs
    from pipeline.training.infer import predict_logits

    dirs = run_dirs(model_dir)
    _, cfg = load_trained(dirs[0], "cpu")
    data = load_split(manifest, split, cfg["image_size"], in_chans=cfg["in_chans"], df=df, classes=cfg["classes"])
    total = np.zeros((len(data.ids), cfg["num_classes"]))
    for d in dirs:
        model, c = load_trained(d, device)
        total += torch.softmax(predict_logits(model, data.images, c["mean"], c["std"], device=device).double(), 1).numpy()
    return data.ids, np.asarray(data.labels, np.int64), total / len(dirs)


def training_noise_matrix(model_dir, df) -> np.ndarray:
    """The noise matrix T [C, C] of the annotators (pipeline.rules.confident.estimate_noise_matrix)
    estimated once, on the training images: their given labels (manifest frame `df`) and p̄, the
    early-epoch seed-averaged softmax of the base models' training record. The val and test splits
    share the training split's annotators, and it is ~9× their size."""
    from pipeline.rules.base import seed_mean_probs
    from pipeline.rules.confident import estimate_noise_matrix

    tr = df[df["split"] == "train"]
    return estimate_noise_matrix(seed_mean_probs(Path(model_dir), tr["id"].to_numpy(np.int64)),
                                 tr["label"].to_numpy(np.int64))


def heldout_issue_rows(model_dir, manifest, filter_by: str = "prune_by_noise_rate", device: str = "cpu",
                       min_p: float = 0.0):
    """flags.csv rows of the val and test images (docs/methods.md §2.3) → DataFrame: id, split,
    is_label, label_score (1 − label quality), suggested_label, suggested_p, from
    :func:`heldout_label_issues` on the base models' out-of-sample softmax, kept only where
    suggested_p ≥ min_p (flag.label_min_p); empty splits skipped."""
    import pandas as pd

    df = read_manifest(manifest)
    parts = []
    noise = training_noise_matrix(model_dir, df) if filter_by == NOISE_POSTERIOR else None
    for split in HELDOUT_SPLITS:
        if not (df["split"] == split).any():
            continue
        ids, labels, probs = heldout_probs(model_dir, manifest, split, device, df=df)
        is_issue, suggested, quality = heldout_label_issues(labels, probs, filter_by, noise)
        p = probs.max(1)
        parts.append(pd.DataFrame({"id": ids, "split": split, "is_label": (is_issue & (p >= min_p)).astype(np.int64),
                                   "label_score": np.round(1.0 - quality, 6), "suggested_label": suggested,
                                   "suggested_p": np.round(p, 6)}))
    return pd.concat(parts, ignore_index=True) if parts else None
