"""Scores from training dynamics (per-epoch, per-sample records written by `clean train`).

Input arrays are [E, N] (epochs × samples), recorded from each sample's minibatch forward
pass before the update. Definitions: docs/methods.md §1 — AUM (Pleiss et al. 2020),
forgetting events (Toneva et al. 2019), data-map confidence and variability (Swayamdipta
et al. 2020). Each function is registered in the SCORES registry (pipeline/scores/__init__.py)
with the dynamics array it reads.
"""
from __future__ import annotations

import numpy as np


def aum(margin: np.ndarray) -> np.ndarray:
    """Area under the margin: mean over epochs of z_y − max_{k≠y} z_k. [E,N] → [N]."""
    return margin.mean(axis=0).astype(np.float64)


def forgetting(correct: np.ndarray) -> np.ndarray:
    """Forgetting events: correct→incorrect flips between consecutive epochs. [E,N] bool → [N].

    A sample never classified correctly in any epoch counts E (never learned: the maximum).
    """
    c = correct.astype(bool)
    flips = (c[:-1] & ~c[1:]).sum(axis=0).astype(np.float64)
    never = ~c.any(axis=0)
    flips[never] = c.shape[0]
    return flips


def confidence(p_label: np.ndarray) -> np.ndarray:
    """Data-map confidence: mean over epochs of p(y_i). [E,N] → [N]."""
    return p_label.mean(axis=0).astype(np.float64)


def variability(p_label: np.ndarray) -> np.ndarray:
    """Data-map variability: std over epochs (population, ddof=0) of p(y_i). [E,N] → [N]."""
    return p_label.std(axis=0).astype(np.float64)


#: dynamics.npz arrays the registered dynamics scores read.
DYNAMICS_INPUTS = ("margin", "correct", "p_label")


def dynamics_scores(dyn: dict) -> dict[str, np.ndarray]:
    """Every registered dynamics score from a `dynamics.npz` mapping → {name: [N]} (float64)."""
    from pipeline.registry import SCORES

    return {e.name: e.fn(dyn[e.extra["uses"]]) for e in SCORES.entries() if "dynamics" in e.needs}
