"""Typed stage configs: one frozen dataclass per stage, built once from validated params.yaml.

Each field names its params.yaml key (``metadata["key"]``) and takes its default from
:data:`pipeline.params.DEFAULTS`, so the defaults live once. ``XConfig.from_params(p)`` reads
the validated params dict (pipeline.params.load_params / override); :func:`load_config`
reads params.yaml + CLI overrides into every stage's config at once. Stage functions take
their paths and one config: ``prune(manifest, scores_csv, out, summary, PruneConfig(keep=0.5))``.
The training config is :class:`Recipe` (model.*, train.*, data.image_size: everything that
defines a run; used as is by pipeline/training/).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from pipeline.params import CHOICES, DEFAULTS, load_params, override


def _key(key: str):
    """A dataclass field read from params.yaml `key` (section.name), default DEFAULTS[section][name]."""
    section, name = key.split(".")
    value = DEFAULTS[section][name]
    if isinstance(value, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(value), metadata={"key": key})
    return field(default=value, metadata={"key": key})


def _from_params(cls, p: dict):
    """An instance of config class `cls` with every field read from the validated params `p`."""
    values = {}
    for f in fields(cls):
        section, name = f.metadata["key"].split(".")
        values[f.name] = copy.deepcopy(p[section][name])
    return cls(**values)


class _Section:
    """from_params for the config dataclasses below."""

    @classmethod
    def from_params(cls, p: dict):
        """This stage's config from validated params (pipeline.params.load_params / override)."""
        return _from_params(cls, p)


@dataclass(frozen=True)
class PrepareConfig(_Section):
    """`clean prepare`: the data source, split fractions and injected label noise (data.*, noise.*)."""

    source: str = _key("data.source")
    root: str | None = _key("data.root")
    classes: list | None = _key("data.classes")
    val_frac: float = _key("data.val_frac")
    test_frac: float = _key("data.test_frac")
    seed: int = _key("data.seed")
    noise_rate: float = _key("noise.rate")
    noise_kind: str = _key("noise.kind")
    noise_pairs: dict | None = _key("noise.pairs")
    noise_seed: int = _key("noise.seed")
    noise_splits: list = _key("noise.splits")


@dataclass(frozen=True)
class ScoreConfig(_Section):
    """`clean score` (score.*; `subset` is params.yaml score.params: which parameters' gradient)."""

    norm: str = _key("score.norm")
    subset: str = _key("score.params")
    batch_size: int = _key("score.batch_size")
    split: str = _key("score.split")
    self_influence: bool = _key("score.self_influence")
    val_influence: bool = _key("score.val_influence")
    embeddings: bool = _key("score.embeddings")
    seed_embeddings: bool = _key("score.seed_embeddings")
    importance: bool = _key("score.importance")
    importance_dim: int = _key("score.importance_dim")
    device: str = _key("train.device")
    workers: int = _key("train.workers")
    cache_max_gb: float = _key("data.cache_max_gb")


@dataclass(frozen=True)
class FlagConfig(_Section):
    """`clean flag` (flag.*): the label rule, the issue types and every detector's threshold."""

    method: str = _key("flag.method")
    issues: list | None = _key("flag.issues")
    filter_by: str = _key("flag.filter_by")
    heldout_filter_by: str = _key("flag.heldout_filter_by")
    aum_max: float | None = _key("flag.aum_max")
    label_min_p: float = _key("flag.label_min_p")
    score: str = _key("flag.score")
    quantile: float = _key("flag.quantile")
    threshold: float = _key("flag.threshold")
    contamination: float = _key("flag.contamination")
    projection_dim: int = _key("flag.projection_dim")
    folds: int = _key("flag.folds")
    seed: int = _key("flag.seed")
    grid: int = _key("flag.grid")
    duplicate_tau: float = _key("flag.duplicate_tau")
    copy_ratio: float = _key("flag.copy_ratio")
    outlier_k: int = _key("flag.outlier_k")
    outlier_mad: float = _key("flag.outlier_mad")
    outlier_fpr: float = _key("flag.outlier_fpr")
    dark: float = _key("flag.dark")
    light: float = _key("flag.light")
    blurry_mad: float = _key("flag.blurry_mad")
    property_fpr: float = _key("flag.property_fpr")
    low_information: float = _key("flag.low_information")
    odd_size: float = _key("flag.odd_size")
    odd_aspect_ratio: float = _key("flag.odd_aspect_ratio")
    device: str = _key("train.device")


@dataclass(frozen=True)
class PruneConfig(_Section):
    """`clean prune` (prune.*): the strategy and what it reads."""

    strategy: str = _key("prune.strategy")
    drop: list | None = _key("prune.drop")
    relabel_min_p: float = _key("prune.relabel_min_p")
    by: str = _key("prune.by")
    keep: float = _key("prune.keep")
    skip: float = _key("prune.skip")
    balanced: bool = _key("prune.balanced")
    seed: int = _key("prune.seed")


@dataclass(frozen=True)
class SweepConfig(_Section):
    """`clean sweep run` (sweep.*): the strategy × keep grid."""

    strategies: list = _key("sweep.strategies")
    keeps: list = _key("sweep.keeps")


#: Recipe fields that never change the numbers (a run may resume with other values)
RESULT_NEUTRAL = ("workers", "cache_max_gb", "device")
#: allowed `train.amp` modes
AMP = CHOICES["train.amp"]

_MODEL, _TRAIN, _DATA = DEFAULTS["model"], DEFAULTS["train"], DEFAULTS["data"]
#: Recipe fields read from params.yaml `train` under the same name
_TRAIN_KEYS = ("epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "schedule", "step_size",
               "gamma", "device", "checkpoint_every", "track", "amp", "workers", "probs_window", "augment")


@dataclass
class Recipe:
    """Everything that defines a training run (params.yaml `model` + `train` + data.image_size)."""

    model: str = _MODEL["name"]
    pretrained: bool = _MODEL["pretrained"]
    weights: str | None = _MODEL["weights"]
    epochs: int = _TRAIN["epochs"]
    batch_size: int = _TRAIN["batch_size"]
    optimizer: str = _TRAIN["optimizer"]
    lr: float = _TRAIN["lr"]
    momentum: float = _TRAIN["momentum"]
    weight_decay: float = _TRAIN["weight_decay"]
    schedule: str = _TRAIN["schedule"]
    step_size: int = _TRAIN["step_size"]
    gamma: float = _TRAIN["gamma"]
    seed: int = _TRAIN["seeds"][0]
    device: str = _TRAIN["device"]
    checkpoint_every: int = _TRAIN["checkpoint_every"]
    track: int = _TRAIN["track"]
    image_size: list | int | None = _DATA["image_size"]
    amp: str = _TRAIN["amp"]                    # auto: bf16, else fp16, on CUDA; off on CPU
    workers: int = _TRAIN["workers"]            # DataLoader worker processes decoding streamed images
    cache_max_gb: float = _DATA["cache_max_gb"]  # a decoded training set larger than this is streamed
    probs_window: float = _TRAIN["probs_window"]  # the first fraction of epochs whose pre-update softmax is averaged
    augment: str = _TRAIN["augment"]            # auto | none | flip-crop (pipeline/training/augment.py)

    @property
    def probs_epochs(self) -> int:
        """How many first epochs the mean pre-update softmax (dynamics `probs`) averages: ≥ 1."""
        return max(1, math.ceil(self.probs_window * self.epochs - 1e-9))

    @classmethod
    def from_params(cls, p: dict) -> "Recipe":
        """The recipe of validated params (pipeline.params.validate / load_params); seed = train.seeds[0]."""
        t, m, d = p["train"], p["model"], p["data"]
        return cls(model=m["name"], pretrained=m["pretrained"], weights=m["weights"],
                   image_size=d["image_size"], seed=t["seeds"][0], cache_max_gb=d["cache_max_gb"],
                   **{k: t[k] for k in _TRAIN_KEYS})


@dataclass(frozen=True)
class Config:
    """Every stage's config from one params.yaml (+ overrides); `seeds` = train.seeds."""

    prepare: PrepareConfig
    train: Recipe
    seeds: list
    score: ScoreConfig
    flag: FlagConfig
    prune: PruneConfig
    sweep: SweepConfig
    params: dict  # the validated params dict they were built from

    @classmethod
    def from_params(cls, p: dict) -> "Config":
        return cls(PrepareConfig.from_params(p), Recipe.from_params(p), list(p["train"]["seeds"]),
                   ScoreConfig.from_params(p), FlagConfig.from_params(p), PruneConfig.from_params(p),
                   SweepConfig.from_params(p), p)


def load_config(path: str | Path = "params.yaml", **overrides) -> Config:
    """params.yaml at `path` (DEFAULTS when absent), validated, with CLI overrides
    (`section__key=value`, None = keep) → every stage's typed config."""
    return Config.from_params(override(load_params(path), **overrides))
