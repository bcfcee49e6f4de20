"""Label remedies registered in STRATEGIES: relabel a label issue to its suggested label, or
drop it when the suggestion is not confident (docs/methods.md §3). A dataset version is then
ids plus label overrides: `label` = the label trained on, `orig_label` = the label before."""
from __future__ import annotations

import numpy as np

from pipeline.errors import CleanError
from pipeline.registry import STRATEGIES


def _suggestions(flags, flags_csv):
    """(is_label bool [N], suggested_label int [N], suggested_p float [N]) from flags.csv rows."""
    need = [c for c in ("is_label", "suggested_label") if c not in flags.columns]
    if need:
        raise CleanError(f"{flags_csv} has no {need[0]} column: relabelling needs the label issue type of "
                         "`clean flag` (flag.issues including label); re-run `clean flag`")
    p = flags["suggested_p"].to_numpy(np.float64) if "suggested_p" in flags.columns else np.full(len(flags), np.nan)
    return flags["is_label"].to_numpy().astype(bool), flags["suggested_label"].to_numpy(np.int64), p


@STRATEGIES.register("relabel", needs=("flags",), relabels=True,
                     doc="keep every label issue with its suggested_label (orig_label kept); the other "
                         "prune.drop types are dropped")
def relabel(flags, labels: np.ndarray, other: np.ndarray, min_p: float, flags_csv) -> tuple[np.ndarray, np.ndarray]:
    """→ (kept bool [N], new labels int [N]): label issues take their suggestion; `other` [N]
    (samples with the other issue types of prune.drop) are dropped."""
    is_label, suggested, _ = _suggestions(flags, flags_csv)
    new = np.where(is_label, suggested, labels)
    return ~other, new


@STRATEGIES.register("relabel-or-drop", needs=("flags",), relabels=True,
                     doc="relabel label issues whose suggestion has p̄ ≥ prune.relabel_min_p, drop the rest "
                         "of the flagged set")
def relabel_or_drop(flags, labels: np.ndarray, other: np.ndarray, min_p: float,
                    flags_csv) -> tuple[np.ndarray, np.ndarray]:
    """→ (kept bool [N], new labels int [N]): a label issue with suggested_p ≥ min_p is relabelled,
    one below it is dropped (NaN confidence: dropped); `other` samples are dropped."""
    is_label, suggested, p = _suggestions(flags, flags_csv)
    sure = is_label & (np.nan_to_num(p, nan=-1.0) >= min_p)
    return ~(other | (is_label & ~sure)), np.where(sure, suggested, labels)
