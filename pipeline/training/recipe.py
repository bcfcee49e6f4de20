"""The training recipe: `Recipe` (everything that defines a run), the learning-rate schedule
`lr_at`, `make_optimizer` and the mixed-precision dtype `amp_dtype` (docs/methods.md §5.1).

Defaults live once, in pipeline/params.py: a Recipe's field defaults are read from
`DEFAULTS`, and `Recipe.from_params` takes the validated params with no defaults of its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.errors import CleanError
from pipeline.params import CHOICES, DEFAULTS

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


def lr_at(recipe: Recipe, epoch: int) -> float:
    """Learning rate used during `epoch` (0-based), per the schedule."""
    if recipe.schedule == "cosine":
        return recipe.lr * 0.5 * (1 + math.cos(math.pi * epoch / recipe.epochs))
    if recipe.schedule == "step":
        return recipe.lr * recipe.gamma ** (epoch // recipe.step_size)
    return recipe.lr


def make_optimizer(recipe: Recipe, params):
    """The recipe's torch optimizer (sgd with momentum, adam or adamw; weight decay) over `params`."""
    import torch

    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)


def amp_dtype(setting: str, device: str):
    """Autocast dtype for `train.amp` on `device` → torch.bfloat16 | torch.float16 | None (fp32).

    auto: bf16 where the GPU supports it, else fp16 (with a GradScaler); off on CPU.
    bf16 also runs on CPU; fp16 needs CUDA.
    """
    import torch

    cuda = str(device).startswith("cuda")
    if setting not in AMP:
        raise CleanError(f"train.amp = {setting!r} is not allowed; use one of: {', '.join(AMP)}")
    if setting == "off" or (setting == "auto" and not cuda):
        return None
    if setting == "fp16" and not cuda:
        raise CleanError("train.amp = fp16 needs a CUDA GPU; on CPU use train.amp: bf16 or off")
    bf16_ok = not cuda or torch.cuda.is_bf16_supported()
    if setting == "bf16" and not bf16_ok:
        raise CleanError("train.amp = bf16 but this GPU has no bfloat16 support; use fp16 or auto")
    if setting == "auto":
        return torch.bfloat16 if bf16_ok else torch.float16
    return torch.bfloat16 if setting == "bf16" else torch.float16
