"""Scores from training dynamics (per-epoch, per-sample records written by `clean train`).

Input arrays are [E, N] (epochs × samples), recorded from each sample's minibatch forward
pass before the update. Definitions: docs/methods.md §1 — AUM (Pleiss et al. 2020),
forgetting events (Toneva et al. 2019), data-map confidence and variability (Swayamdipta
et al. 2020). :func:`dynamics_family` is their SCORES entry: it reads the model's
dynamics.npz for the scored ids.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.formats.dynamics import load_dynamics
from pipeline.registry import SCORES


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


#: dynamics.npz arrays the dynamics scores read.
DYNAMICS_INPUTS = ("margin", "correct", "p_label")


def dynamics_scores(dyn: dict) -> dict[str, np.ndarray]:
    """Every dynamics score from a `dynamics.npz` mapping → {name: [N]} (float64)."""
    return {"aum": aum(dyn["margin"]), "forgetting": forgetting(dyn["correct"]),
            "confidence": confidence(dyn["p_label"]), "variability": variability(dyn["p_label"])}


@SCORES.register_family({
    "aum": dict(needs=("dynamics",), suspicious="low", doc="margin averaged over training epochs (area under the margin)"),
    "forgetting": dict(needs=("dynamics",), doc="correct→incorrect flips during training (never learned = number of epochs)"),
    "confidence": dict(needs=("dynamics",), suspicious="low", doc="mean over epochs of p(label) (data maps)"),
    "variability": dict(needs=("dynamics",), doc="std over epochs of p(label) (data maps)"),
})
def dynamics_family(inputs, config) -> dict[str, np.ndarray]:
    """The dynamics scores of `inputs.ids` [N] from model_dir/dynamics.npz, matched by id (NaN for
    a sample never trained on, or without the file); `with_dynamics` bool [N] marks the found ones."""
    cols = {k: inputs.nan() for k in ("aum", "forgetting", "confidence", "variability")}
    path = Path(inputs.model_dir) / "dynamics.npz"
    if not path.exists():
        return {**cols, "with_dynamics": np.zeros(len(inputs.ids), bool)}
    dyn = load_dynamics(path, need=("ids",) + DYNAMICS_INPUTS)
    ds = dynamics_scores(dyn)
    where = pd.Series(np.arange(len(dyn["ids"])), index=dyn["ids"]).reindex(inputs.ids).to_numpy()
    have = ~np.isnan(where)
    for k in cols:
        cols[k][have] = ds[k][where[have].astype(np.int64)]
    return {**cols, "with_dynamics": have}
