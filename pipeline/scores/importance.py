"""The `importance` score family: the predicted change of the mean validation loss (nats) when a
training image is removed — TRAK over the trained seeds' models (pipeline/scores/attribution.py,
docs/methods.md §1.6). > 0: removing it raises the validation loss (important); < 0: lowers it
(harmful). The per-model values go to scores/attribution.npz (pipeline/stages/score.py), from
which `clean prune` predicts a version's effect (pipeline/effect.py).
"""
from __future__ import annotations

import copy

import numpy as np

from pipeline.registry import SCORES

#: extras the family returns beside its column (one process only, so never gathered across ranks):
#: effects [N, M], val_ids [V], val_loss [V, M], calibration [M] (1/r̄ per model); the stage writes them
#: to attribution.npz
EXTRAS = ("attribution_effects", "attribution_val_ids", "attribution_val_loss", "attribution_calibration")


def seed_models(model_dir, model, device: str) -> list:
    """The scored model and every other seed's model in model_dir/seeds/seed_<s>/ (eval mode)."""
    from pipeline.models import load_weights, run_dirs

    models = [model]
    for d in run_dirs(model_dir)[1:]:
        m = copy.deepcopy(model)
        load_weights(m, d / "model.safetensors")
        models.append(m.to(device).eval())
    return models


@SCORES.register("importance", needs=("model", "val", "backward"), suspicious="low", extras=EXTRAS,
                 doc="predicted change of the mean validation loss (nats) if the image is removed: TRAK over the "
                     "seeds' models (> 0: important, < 0: harmful)")
def importance_family(inputs, config) -> dict[str, np.ndarray]:
    """importance [N] = mean over the seeds' models of the calibrated removal effect, with the
    extras EXTRAS (per model [N, M], the reference rows, their loss per model). NaN when not
    computed: score.importance false, no val split, or under torchrun (one process only)."""
    from pipeline import distributed as D

    if not config.importance or inputs.val is None or D.enabled() or config.split != "train":
        return {"importance": inputs.nan()}
    from pipeline.scores.attribution import removal_effects

    if inputs.progress:
        inputs.progress("log", message=f"importance: TRAK over the seeds' models, k = {config.importance_dim}")
    models = seed_models(inputs.model_dir, inputs.model, inputs.device)
    att = removal_effects(models, inputs.images, inputs.labels, inputs.val.images, inputs.val.labels, inputs.mean,
                          inputs.std, config.importance_dim, config.batch_size, inputs.device,
                          reference=np.ones(len(inputs.val.labels), bool))
    return {"importance": att["effects"].mean(0), "attribution_effects": att["effects"].T,
            "attribution_val_ids": np.asarray(inputs.val.ids, np.int64), "attribution_val_loss": att["val_loss"].T,
            "attribution_calibration": att["calibration"]}
