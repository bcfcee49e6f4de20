"""Out-of-sample predicted probabilities by k-fold cross-fitting (for confident learning).

In-sample probabilities are biased toward the given labels, so each sample's probabilities
come from a model (same architecture and recipe, fresh init) that never saw it.
"""
from __future__ import annotations

import numpy as np

from pipeline.training.fit import fit
from pipeline.training.infer import predict_logits


def out_of_sample_probs(images: np.ndarray, labels: np.ndarray, num_classes: int, recipe, folds: int,
                        seed: int = 0, progress=None) -> np.ndarray:
    """k-fold (stratified, seeded) out-of-sample softmax probabilities → float64 [N, C].

    images uint8 [N,C,H,W], labels int [N]. Trains `folds` models with `recipe`.
    """
    import torch
    from sklearn.model_selection import KFold, StratifiedKFold

    n = len(labels)
    if folds > n:
        from pipeline.errors import CleanError

        raise CleanError(f"flag.folds = {folds} is more than the {n} training samples: each fold needs at least one; "
                         f"set flag.folds to 2..{n} (5 is usual)")
    counts = np.bincount(labels, minlength=num_classes)
    strat = counts[counts > 0].min() >= folds
    splitter = (StratifiedKFold if strat else KFold)(n_splits=folds, shuffle=True, random_state=seed)
    probs = np.zeros((n, num_classes), np.float64)
    for k, (tr, te) in enumerate(splitter.split(np.zeros(n), labels if strat else None)):
        if progress:
            progress("log", message=f"cross-fitting fold {k + 1}/{folds}: train {len(tr)}, predict {len(te)}")
        res = fit(images[tr], labels[tr], num_classes, recipe, progress=progress)
        logits = predict_logits(res.model, images[te], res.mean, res.std)
        probs[te] = torch.softmax(logits.double(), 1).numpy()
    return probs
