"""What a score family is given: :class:`ScoreInputs` (one rank's block of samples + the model).

Every SCORES entry is ``fn(inputs: ScoreInputs, config: ScoreConfig) -> {name: array [N]}``:
a family function fills its own columns (and may add per-sample extras such as `pred` or the
image features); `clean score` runs each family once (``SCORES.families()``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class ScoreInputs:
    """The samples to score and the trained model.

    model: eval-mode torch module; images: uint8 [N, C, H, W] (array or streamed); labels: int [N];
    ids: int [N] manifest ids; mean, std: the model's input normalisation (per channel);
    model_dir: the model folder (config.json, checkpoints/, dynamics.npz); device: torch device;
    progress: pipeline/progress.py callback or None; checkpoints: [(file, lr)] the saved epoch
    checkpoints TracIn sums over ([] = self_influence not computed); val_checkpoints, val: the
    same for val_influence and the validation Split (None = not computed).
    """

    model: object
    images: object
    labels: np.ndarray
    ids: np.ndarray
    mean: list
    std: list
    model_dir: Path
    device: str = "cpu"
    progress: object = None
    checkpoints: list = field(default_factory=list)
    val_checkpoints: list = field(default_factory=list)
    val: object = None

    def nan(self) -> np.ndarray:
        """float [N] of NaN: the value of a score that is not computed."""
        return np.full(len(self.labels), np.nan)
