"""Per-sample scores: the SCORES registry (one entry per column of scores/scores.csv).

Families, one module each: forward pass and checkpoints (compute.py: loss, grad_norm, el2n,
margin, self_influence; gradient norms from engine.py / layers.py / head.py), train → validation
influence (influence.py: val_influence) and training dynamics (dynamics.py). Formulas: docs/methods.md §1. Registration order is column order.
"""
from pipeline.registry import SCORES


def _val_influence(*args, **kw):
    """pipeline.scores.influence.val_influence, imported on first call (it imports torch)."""
    from pipeline.scores.influence import val_influence

    return val_influence(*args, **kw)

def _importance(*args, **kw):
    """pipeline.scores.attribution.removal_effects, imported on first call (it imports torch)."""
    from pipeline.scores.attribution import removal_effects

    return removal_effects(*args, **kw)


from pipeline.scores import compute as _fw
from pipeline.scores import dynamics as _dyn

SCORES.register("loss", needs=("forward",), doc="cross-entropy of the given label (nats)")(_fw.forward_scores)
SCORES.register("grad_norm", needs=("forward", "backward"),
                doc="‖∇_θ' L_i‖ for score.norm over score.params (closed form for `last`, ghost norms otherwise)"
                )(_fw.forward_scores)
SCORES.register("el2n", needs=("forward",), doc="‖softmax − onehot‖₂")(_fw.forward_scores)
SCORES.register("margin", needs=("forward",), suspicious="low", doc="z_y − max_{k≠y} z_k of the final model"
                )(_fw.forward_scores)
SCORES.register("aum", needs=("dynamics",), suspicious="low", uses="margin",
                doc="margin averaged over training epochs (area under the margin)")(_dyn.aum)
SCORES.register("forgetting", needs=("dynamics",), uses="correct",
                doc="correct→incorrect flips during training (never learned = number of epochs)")(_dyn.forgetting)
SCORES.register("confidence", needs=("dynamics",), suspicious="low", uses="p_label",
                doc="mean over epochs of p(label) (data maps)")(_dyn.confidence)
SCORES.register("variability", needs=("dynamics",), uses="p_label",
                doc="std over epochs of p(label) (data maps)")(_dyn.variability)
SCORES.register("self_influence", needs=("checkpoints", "backward"),
                doc="TracIn: Σ over epoch checkpoints of lr·‖∇L_i‖₂²")(_fw.self_influence)
SCORES.register("val_influence", needs=("checkpoints", "val", "backward"), suspicious="low",
                doc="TracIn train→validation: Σ over checkpoints of lr·⟨∇L_i, ∇L̄_val⟩ (< 0: harmful)"
                )(_val_influence)
SCORES.register("importance", needs=("model", "val", "backward"),
                doc="predicted change of the mean validation loss (nats) if the image is removed: TRAK over the "
                    "seeds' models (> 0: important, < 0: harmful)")(_importance)
