"""Per-sample scores: the SCORES registry (one entry per column of scores/scores.csv).

Families, one module each, every one ``fn(inputs: ScoreInputs, config: ScoreConfig) ->
{column: [N]}`` (inputs.py): the forward pass (compute.py: loss, grad_norm, el2n, margin;
gradient norms from engine.py / layers.py / head.py), training dynamics (dynamics.py: aum,
forgetting, confidence, variability) and TracIn over the checkpoints (tracin.py:
self_influence, val_influence). pipeline/registry.py imports them on first use; their order
is the column order. Formulas: docs/methods.md §1.
"""
