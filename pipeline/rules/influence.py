"""The `harmful` issue type: training images whose removal is predicted to lower the validation
loss by more than chance allows — every trained seed's model agrees on the sign, and the size is
more than HARM_RATIO times the image's fair share L̄_val / N of the validation loss.
Formulas: docs/methods.md §1.6 (importance, scores/attribution.npz) and §2.2 (harmful)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import CleanError
from pipeline.config import FlagConfig
from pipeline.registry import ISSUES
from pipeline.rules.base import IssueResult

#: harmful ⇔ every model's effect < 0 and −ē·N / L̄_val > HARM_RATIO (bench/lds.py: ≤ 1 % of clean
#: digits and Fashion-MNIST flagged, precision against planted label noise in docs/benchmarks.md)
HARM_RATIO = 2.0


def harm_ratio(effects: np.ndarray, val_loss: float) -> np.ndarray:
    """−ē_i · N / L̄_val [N]: how many times its fair share L̄/N of the mean validation loss removing
    image i is predicted to take away (> 0: removing it helps). `effects` [M, N] nats per model."""
    n = effects.shape[1]
    return -effects.mean(0) * n / max(float(val_loss), 1e-12)


@ISSUES.register("harmful", needs=("score",), score="importance",
                 doc="removing the image is predicted to lower the validation loss, by every seed's model and by "
                     f"more than {HARM_RATIO:g}× its share L̄/N (TRAK importance)")
def harmful_issue(inputs, cfg: FlagConfig) -> IssueResult:
    """is_harmful = every seed model's removal effect < 0 and harm ratio > HARM_RATIO;
    harmful_score = the harm ratio (higher = more harmful). Reads scores/attribution.npz beside
    scores.csv (written by `clean score` with score.importance: true)."""
    from pipeline.effect import positions, read_attribution

    path = Path(inputs.scores_csv).parent / "attribution.npz"
    a = read_attribution(path) if path.exists() else None
    if a is None or a["effects"].shape[0] == 0:
        raise CleanError(f"{path}: no attribution, which the `harmful` issue type needs; run `clean score` with "
                         "score.importance: true (needs a val split), or leave harmful out of flag.issues")
    effects = a["effects"][:, positions(a["ids"], inputs.ids, path)]
    ratio = harm_ratio(effects, float(a["val_loss"].mean()))
    flagged = (effects < 0).all(0) & (ratio > HARM_RATIO)
    summary = {"harm_ratio": HARM_RATIO, "models": int(effects.shape[0]), "val_loss": float(a["val_loss"].mean())}
    if "noisy" in inputs.scores.columns:
        from pipeline.rules.metrics import precision_recall

        p, r = precision_recall(flagged, inputs.scores["noisy"].to_numpy().astype(bool))
        summary.update({"precision_vs_noise": p, "recall_vs_noise": r})
    return IssueResult(flagged, ratio, f"every model's effect < 0 and harm ratio > {HARM_RATIO:g}", summary=summary)
