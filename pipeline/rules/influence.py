"""The `harmful` issue type: training images whose TracIn influence on the validation loss is
negative (`val_influence` < 0 in scores.csv: a gradient step on the image raises the
validation loss). Formulas: docs/methods.md §1 (val_influence) and §2 (harmful)."""
from __future__ import annotations

import numpy as np

from pipeline.errors import CleanError
from pipeline.config import FlagConfig
from pipeline.registry import ISSUES
from pipeline.rules.base import IssueResult

#: harmful ⇔ val_influence < HARM_THRESHOLD (0: the sign of the first-order change of the val loss)
HARM_THRESHOLD = 0.0


@ISSUES.register("harmful", needs=("score",), score="val_influence",
                 doc="a step on the image raises the validation loss: val_influence < 0 (TracIn train→validation)")
def harmful_issue(inputs, cfg: FlagConfig) -> IssueResult:
    """is_harmful = val_influence < 0; harmful_score = −val_influence (higher = more harmful).

    Hard but correctly labelled images have positive influence (their gradient points the way the
    validation gradient does); mislabelled ones point against it. NaN (not scored) is not harmful.
    """
    df, path = inputs.scores, inputs.scores_csv
    if "val_influence" not in df.columns or df["val_influence"].isna().all():
        raise CleanError(f"{path}: no val_influence values, which the `harmful` issue type needs; run `clean score` "
                         "with score.val_influence: true (needs a val split), or leave harmful out of flag.issues")
    v = df["val_influence"].to_numpy(np.float64)
    flagged = np.isfinite(v) & (v < HARM_THRESHOLD)
    summary = {"threshold": HARM_THRESHOLD, "n_scored": int(np.isfinite(v).sum())}
    if "noisy" in df.columns:
        from pipeline.rules.metrics import precision_recall

        p, r = precision_recall(flagged, df["noisy"].to_numpy().astype(bool))
        summary.update({"precision_vs_noise": p, "recall_vs_noise": r})
    return IssueResult(flagged, -v, f"val_influence < {HARM_THRESHOLD:g}", summary=summary)
