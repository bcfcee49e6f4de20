"""TracIn score families over the saved epoch checkpoints: self_influence and val_influence
(formulas: docs/methods.md §1; the math in compute.py and influence.py)."""
from __future__ import annotations

import numpy as np

from pipeline.registry import SCORES
from pipeline.scores.compute import self_influence


@SCORES.register("self_influence", needs=("checkpoints", "backward"),
                 doc="TracIn: Σ over epoch checkpoints of lr·‖∇L_i‖₂²")
def self_influence_family(inputs, config) -> dict[str, np.ndarray]:
    """self_influence [N] over inputs.checkpoints (NaN when there are none: not computed)."""
    if not inputs.checkpoints:
        return {"self_influence": inputs.nan()}
    return {"self_influence": self_influence(inputs.model, inputs.checkpoints, inputs.images, inputs.labels,
                                             inputs.mean, inputs.std, config.subset, config.batch_size,
                                             inputs.device, inputs.progress)}


@SCORES.register("val_influence", needs=("checkpoints", "val", "backward"), suspicious="low",
                 doc="TracIn train→validation: Σ over checkpoints of lr·⟨∇L_i, ∇L̄_val⟩ (< 0: harmful)")
def val_influence_family(inputs, config) -> dict[str, np.ndarray]:
    """val_influence [N] against inputs.val (the validation rows that are not label issues) over
    inputs.val_checkpoints (NaN without a val split or with score.val_influence: false)."""
    if inputs.val is None or not config.val_influence:
        return {"val_influence": inputs.nan()}
    from pipeline.scores.influence import val_influence  # imports torch: only when it runs

    return {"val_influence": val_influence(inputs.model, inputs.val_checkpoints, inputs.images, inputs.labels,
                                           inputs.val.images, inputs.val.labels, inputs.mean, inputs.std,
                                           config.subset, config.batch_size, inputs.device, inputs.progress)}
