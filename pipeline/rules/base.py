"""What every flag rule shares: :class:`FlagResult`, the inputs a rule may ask for, checks.

A rule is registered in :data:`pipeline.registry.RULES` as ``fn(inputs, cfg) -> FlagResult``,
where ``inputs`` is a :class:`RuleInputs` (lazy: a rule pays only for what it asks for) and
``cfg`` the validated ``flag`` section of params.yaml (:class:`pipeline.config.FlagConfig`). Parameter errors raise
:class:`~pipeline.errors.CleanError` naming the params.yaml key.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from dataclasses import dataclass, field

import numpy as np

from pipeline.checks import as_float as _as_float
from pipeline.checks import check_seed as _check_seed  # noqa: F401  (re-exported to the rules)
from pipeline.checks import fmt as _fmt
from pipeline.errors import CleanError
from pipeline.formats.manifest import read_manifest


@dataclass(frozen=True)
class FlagResult:
    """Outcome of one flag rule.

    flagged: bool [N]   True = flagged by the rule.
    value:   float [N]  the score the rule thresholds (higher = more suspicious).
    rule:    str        human-readable rule, e.g. ``"loss >= q0.95 (2.31)"``.
    """

    flagged: np.ndarray
    value: np.ndarray
    rule: str

    @property
    def n_flagged(self) -> int:
        """Number of flagged samples."""
        return int(np.count_nonzero(self.flagged))


def _check_open_unit(x, name: str) -> float:
    """x in (0, 1), else CleanError ``"<name> must be in (0, 1), got <x>"``."""
    v = _as_float(x, name)
    if not (0.0 < v < 1.0):  # also rejects NaN
        raise CleanError(f"{name} must be in (0, 1), got {_fmt(x)}")
    return v


def _float_array(x, what: str) -> np.ndarray:
    """np.asarray(x, float) with a CleanError instead of a numpy traceback."""
    try:
        return np.asarray(x, dtype=float)
    except (TypeError, ValueError):
        raise CleanError(f"{what} must be a numeric array") from None


def _scores_1d(values, score_name: str) -> np.ndarray:
    """Validate a per-sample score vector: 1-D, non-empty, finite."""
    v = _float_array(values, f"score '{score_name}'")
    if v.ndim != 1:
        raise CleanError(f"score '{score_name}' must be a 1-D array [N], got shape {v.shape}")
    if v.size == 0:
        raise CleanError(f"score '{score_name}' is empty: nothing to flag")
    bad = int(np.count_nonzero(~np.isfinite(v)))
    if bad:
        raise CleanError(
            f"score '{score_name}' has {bad} non-finite value(s) (NaN/inf); "
            "re-run the score stage or choose another score"
        )
    return v


def _labels_1d(labels, n: int, n_classes: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n,):
        raise CleanError(f"labels must be a 1-D array [N] with N = {n}, got shape {y.shape}")
    if y.dtype.kind not in "iu":
        if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():
            y = y.astype(np.int64)
        else:
            raise CleanError(f"labels must be integer class ids, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if n and (y.min() < 0 or y.max() >= n_classes):
        raise CleanError(
            f"labels must be in [0, {n_classes}) to match pred_probs' {n_classes} columns, "
            f"got range [{int(y.min())}, {int(y.max())}]"
        )
    return y


@dataclass
class IssueResult:
    """Outcome of one issue-type detector on the training samples (scores.csv order).

    flagged: bool [N] (True = the sample has this issue) → flags.csv `is_<type>`;
    score: float [N], higher = more severe (NaN where undefined) → `<type>_score`;
    columns: extra per-sample columns for flags.csv (e.g. duplicate_group, suggested_label);
    summary: JSON-serialisable facts for metrics/flags.json (e.g. groups, conflicts, leakage);
    rule: the human-readable rule that fired.
    """

    flagged: np.ndarray
    score: np.ndarray
    rule: str
    columns: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


def rows_for(manifest, ids: np.ndarray, classes):
    """The manifest rows of the scored samples `ids` [N], in that order (CleanError if one is missing)."""

    df = read_manifest(manifest, classes).set_index("id")
    missing = np.setdiff1d(ids, df.index.to_numpy())
    if len(missing):
        raise CleanError(f"scores hold id {int(missing[0])} which is not in {manifest}; the scores come from "
                         "another manifest: rerun `clean score`")
    return df.loc[ids]


def load_features(path: Path, train_ids: np.ndarray) -> dict:
    """Read embeddings.npz; CleanError when missing or not from the scored manifest."""

    if not path.exists():
        raise CleanError(f"{path} not found: the duplicate / outlier / image checks need it; run `clean score` "
                         "with score.embeddings: true (or leave those issue types out of flag.issues)")
    try:
        with np.load(path, allow_pickle=False) as z:
            # the other seed models' embeddings (emb_1, …) are read when the outlier check asks for them
            # (pipeline/rules/knn.py::embedding), so they are not held through the duplicate search
            feats = {k: z[k] for k in z.files if not is_seed_embedding(k)}
            feats["_later"] = {k: Path(path) for k in z.files if is_seed_embedding(k)}
        all_ids = np.asarray(feats["ids"], np.int64)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise CleanError(f"{path}: not a readable embeddings file ({type(e).__name__}: {e}); re-run `clean score`") from None
    order = np.argsort(all_ids, kind="stable")
    at = np.clip(np.searchsorted(all_ids[order], train_ids), 0, max(len(all_ids) - 1, 0))
    found = len(all_ids) > 0 and all_ids[order][at] == train_ids
    missing = np.flatnonzero(~np.asarray(found, bool) if len(all_ids) else np.ones(len(train_ids), bool))
    if len(missing):
        raise CleanError(f"{path} has no row for training id {int(train_ids[missing[0]])} ({len(missing)} missing); "
                         "it comes from another manifest: re-run `clean score`")
    feats["train_pos"] = order[at].astype(np.int64)
    return feats


def is_seed_embedding(key: str) -> bool:
    """Whether an embeddings.npz array is another seed model's embedding: emb_1, emb_2, …"""
    return key.startswith("emb_") and key[4:].isdigit()


def seed_mean_probs(model_dir: Path, ids: np.ndarray) -> np.ndarray:
    """Mean over seeds of the epoch-averaged pre-update softmax [N, C] of the samples `ids` (float64)."""
    from pipeline.formats.dynamics import load_dynamics

    fix = f"retrain with `clean train --out {model_dir}` (this model's training record has no mean softmax)"
    dyn = load_dynamics(model_dir / "dynamics.npz", need=("ids",))
    if "probs" not in dyn:
        raise CleanError(f"{model_dir}/dynamics.npz: no 'probs' array; {fix}")
    records = [(dyn["ids"], dyn["probs"])] + [
        (r["ids"], r["probs"]) for r in (load_dynamics(f, need=("ids", "probs"))
                                         for f in sorted((model_dir / "seeds").glob("seed_*/probs.npz")))]
    total = np.zeros((len(ids), dyn["probs"].shape[1]), np.float64)
    for rid, pr in records:
        order = np.argsort(rid, kind="stable")
        at = np.clip(np.searchsorted(rid[order], ids), 0, len(rid) - 1)
        if not np.array_equal(rid[order][at], ids):
            raise CleanError(f"{model_dir}: the training record does not cover every scored id; the scores come "
                             "from another manifest: re-run `clean score`")
        total += pr[order[at]].astype(np.float64)
    total /= len(records)
    return total / total.sum(axis=1, keepdims=True)


class RuleInputs:
    """What a rule may need, computed on first use (docs/methods.md §2).

    scores: the scores.csv DataFrame (one row per training sample); scores_csv: its path;
    model_dir, manifest, recipe, device, progress: for rules that need the model, the
    images or extra trainings.
    """

    def __init__(self, scores, scores_csv, model_dir=None, manifest=None, recipe=None, device="cpu", progress=None):
        self.scores, self.scores_csv = scores, scores_csv
        self.model_dir, self.manifest, self.recipe = model_dir, manifest, recipe
        self.device, self.progress = device, progress
        self.ids = scores["id"].to_numpy(np.int64)
        self.labels = scores["label"].to_numpy(np.int64)

    def features(self) -> dict:
        """scores/embeddings.npz beside scores.csv (every split: ids, split, label, emb, hash, image
        stats — pipeline/scores/features.py) plus `train_pos` [N]: the row of each training sample."""
        if getattr(self, "_features", None) is None:
            self._features = load_features(Path(self.scores_csv).parent / "embeddings.npz", self.ids)
        return self._features

    def rule_result(self, cfg) -> FlagResult:
        """The flag.method rule's result (computed once: it drives flagged/rule/value and `label`)."""
        if getattr(self, "_rule_result", None) is None:
            from pipeline.registry import RULES

            self._rule_result = RULES[cfg.method].fn(self, cfg)
        return self._rule_result

    def probs(self) -> np.ndarray:
        """p̄ [N, C]: the mean over epochs of each sample's pre-update softmax, averaged over the
        trained seeds (model_dir/dynamics.npz + model_dir/seeds/*/probs.npz), in scores.csv order."""
        if getattr(self, "_probs", None) is None:
            self.require("confident-dynamics", "model_dir")
            self._probs = seed_mean_probs(Path(self.model_dir), self.ids)
        return self._probs

    def score(self, name: str) -> tuple[np.ndarray, str]:
        """Score column `name` oriented so that high = suspicious → (values [N], display name)."""
        from pipeline.scores.order import oriented

        df, path = self.scores, self.scores_csv
        if name not in df.columns:
            raise CleanError(f"flag.score = {name!r} is not a column of {path}; "
                             f"use one of: {', '.join(c for c in df.columns if c not in ('id', 'path', 'label', 'pred'))}")
        vals = df[name].to_numpy(np.float64)
        if np.isnan(vals).all():
            raise CleanError(f"{path}: column '{name}' is empty (not computed); choose another flag.score")
        bad = ~np.isfinite(vals)
        if bad.any():
            raise CleanError(f"{path}: column '{name}' has {int(bad.sum())} NaN/inf value(s) (first: id "
                             f"{int(self.ids[np.flatnonzero(bad)[0]])}); re-run `clean score` or choose another flag.score")
        return oriented(vals, name)

    def require(self, method: str, *what: str) -> None:
        """CleanError unless the stage was given `what` (model_dir, manifest, recipe)."""
        names = {"model_dir": "--model", "manifest": "--manifest", "recipe": "the training recipe (params.yaml)"}
        missing = [names[w] for w in what if getattr(self, w) is None]
        if missing:
            raise CleanError(f"flag.method = {method} needs {' and '.join(missing)}")
