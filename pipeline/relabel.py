"""Label remedies registered in STRATEGIES: relabel a label issue to its suggested label, or
drop it when the suggestion is not confident (docs/methods.md §3). A dataset version is then
ids plus label overrides: `label` = the label trained on, `orig_label` = the label before.
Both are ordinary strategies: ``fn(inputs: PruneInputs) -> PruneResult``."""
from __future__ import annotations

import numpy as np

from pipeline.errors import CleanError
from pipeline.registry import STRATEGIES
from pipeline.strategies import PruneInputs, PruneResult, other_drop_types


def _suggestions(inputs: PruneInputs):
    """(is_label bool [N], suggested_label int [N], suggested_p float [N]) from flags.csv rows."""
    flags = inputs.flags()
    need = [c for c in ("is_label", "suggested_label") if c not in flags.columns]
    if need:
        raise CleanError(f"{inputs.flags_csv} has no {need[0]} column: relabelling needs the label issue type of "
                         "`clean flag` (flag.issues including label); re-run `clean flag`")
    p = flags["suggested_p"].to_numpy(np.float64) if "suggested_p" in flags.columns else np.full(len(flags), np.nan)
    return flags["is_label"].to_numpy().astype(bool), flags["suggested_label"].to_numpy(np.int64), p


def _result(inputs: PruneInputs, kept: np.ndarray, labels: np.ndarray) -> PruneResult:
    if not kept.any():
        raise CleanError(f"prune.strategy = {inputs.config.strategy} would keep no training sample; check prune.drop")
    drop = inputs.config.drop
    return PruneResult(kept, labels, {"drop": None if drop is None else list(drop), "by": None, "keep": None,
                                      "skip": None})


@STRATEGIES.register("relabel", needs=("flags",),
                     doc="keep every label issue with its suggested_label (orig_label kept); the other "
                         "prune.drop types are dropped")
def relabel(inputs: PruneInputs) -> PruneResult:
    """Label issues take their suggestion; samples with the other issue types of prune.drop are dropped."""
    is_label, suggested, _ = _suggestions(inputs)
    return _result(inputs, ~other_drop_types(inputs), np.where(is_label, suggested, inputs.labels))


@STRATEGIES.register("relabel-or-drop", needs=("flags",),
                     doc="relabel label issues whose suggestion has p̄ ≥ prune.relabel_min_p, drop the rest "
                         "of the flagged set")
def relabel_or_drop(inputs: PruneInputs) -> PruneResult:
    """A label issue with suggested_p ≥ prune.relabel_min_p is relabelled, one below it is dropped
    (NaN confidence: dropped); samples with the other prune.drop types are dropped."""
    is_label, suggested, p = _suggestions(inputs)
    sure = is_label & (np.nan_to_num(p, nan=-1.0) >= inputs.config.relabel_min_p)
    return _result(inputs, ~(other_drop_types(inputs) | (is_label & ~sure)), np.where(sure, suggested, inputs.labels))


@STRATEGIES.register("relabel-agree", needs=("flags",),
                     doc="relabel a label issue only where two views agree (the rule's suggestion = the kNN "
                         "vote of its embedding neighbours) and p̄ ≥ prune.relabel_min_p; leave the other label "
                         "issues as they are; drop the other prune.drop types")
def relabel_agree(inputs: PruneInputs) -> PruneResult:
    """A label issue is relabelled to suggested_label when flags.csv's knn_label (the majority label
    of its nearest training embeddings) says the same class and suggested_p ≥ prune.relabel_min_p;
    every other label issue keeps its given label (an uncertain, hard image is left alone); samples
    with the other issue types of prune.drop are dropped (docs/methods.md §3)."""
    is_label, suggested, p = _suggestions(inputs)
    flags = inputs.flags()
    if "knn_label" not in flags.columns:
        raise CleanError(f"{inputs.flags_csv} has no knn_label column: relabel-agree needs the embeddings view "
                         "(score.embeddings: true, then `clean flag`)")
    agree = is_label & (flags["knn_label"].to_numpy(np.float64) == suggested) & (suggested != inputs.labels)
    sure = agree & (np.nan_to_num(p, nan=-1.0) >= inputs.config.relabel_min_p)
    return _result(inputs, ~other_drop_types(inputs), np.where(sure, suggested, inputs.labels))
