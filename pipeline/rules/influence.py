"""The `harmful` issue type: training images whose removal is predicted to lower the validation
loss by more than chance allows — every trained seed's model agrees on the sign, and the predicted
harm is beyond a null from the scores' own spread: larger than the NULL_QUANTILE quantile of the
predicted help of the images on the other side (ē > 0).
Formulas: docs/methods.md §1.6 (importance, scores/attribution.npz) and §2.2 (harmful)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import CleanError
from pipeline.config import FlagConfig
from pipeline.registry import ISSUES
from pipeline.rules.base import IssueResult

#: harmful ⇔ every model's effect < 0 and −ē > the NULL_QUANTILE quantile of ē over the images with ē > 0
#: (docs/benchmarks.md issue 23: ≤ 1 % of clean digits and Fashion-MNIST flagged — 0.08–0.64 %, the 10k default-recipe
#: folders included, where 0.97 flagged 1.4 % — and precision ≥ 0.77 against planted noise; the former rule, harm
#: ratio > 2, flagged 4–6 % of clean images on the calibrated scale)
NULL_QUANTILE = 0.99


def harm_ratio(effects: np.ndarray, val_loss: float) -> np.ndarray:
    """−ē_i · N / L̄_val [N]: how many times its fair share L̄/N of the mean validation loss removing
    image i is predicted to take away (> 0: removing it helps). `effects` [M, N] nats per model."""
    n = effects.shape[1]
    return -effects.mean(0) * n / max(float(val_loss), 1e-12)


def harmful_mask(effects: np.ndarray) -> tuple[np.ndarray, float]:
    """→ (flagged bool [N], the cut in nats): every model's e_m(i) < 0 and −ē_i > q, q = the
    NULL_QUANTILE quantile of ē over the images predicted to help (ē > 0; 0 when none does).
    Scale-free: the cut moves with the estimator's own spread, not with a fitted constant."""
    e = effects.mean(0)
    q = float(np.quantile(e[e > 0], NULL_QUANTILE)) if (e > 0).any() else 0.0
    return (effects < 0).all(0) & (-e > q), q


@ISSUES.register("harmful", needs=("score",), score="importance",
                 doc="removing the image is predicted to lower the validation loss, by every seed's model and by more "
                     f"than the {NULL_QUANTILE:g} quantile of the helpful images' predicted help (TRAK importance)")
def harmful_issue(inputs, cfg: FlagConfig) -> IssueResult:
    """is_harmful = harmful_mask (every seed model's removal effect < 0, harm beyond the helpful side's
    NULL_QUANTILE quantile); harmful_score = the harm ratio (higher = more harmful). Reads
    scores/attribution.npz beside scores.csv (written by `clean score` with score.importance: true)."""
    from pipeline.effect import effects_of, read_attribution

    path = Path(inputs.scores_csv).parent / "attribution.npz"
    effects = effects_of(path, inputs.ids)
    if effects is None:
        raise CleanError(f"{path}: no attribution, which the `harmful` issue type needs; run `clean score` with "
                         "score.importance: true (needs a val split), or leave harmful out of flag.issues")
    a = read_attribution(path)
    ratio = harm_ratio(effects, float(a["val_loss"].mean()))
    flagged, cut = harmful_mask(effects)
    summary = {"null_quantile": NULL_QUANTILE, "cut_nats": cut, "models": int(effects.shape[0]),
               "val_loss": float(a["val_loss"].mean())}
    if "noisy" in inputs.scores.columns:
        from pipeline.rules.metrics import precision_recall

        p, r = precision_recall(flagged, inputs.scores["noisy"].to_numpy().astype(bool))
        summary.update({"precision_vs_noise": p, "recall_vs_noise": r})
    return IssueResult(flagged, ratio, f"every model's effect < 0 and harm > {cut:.3g} nats (the helpful images' "
                                       f"{NULL_QUANTILE:g} quantile)", summary=summary)
