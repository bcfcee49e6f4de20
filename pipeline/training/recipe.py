"""How a training recipe runs: the learning-rate schedule `lr_at`, `make_optimizer` and the
mixed-precision dtype `amp_dtype` (docs/methods.md §5.1). The recipe itself, `Recipe`
(everything that defines a run: the train stage's typed config), lives with the other stage
configs in pipeline/config.py and is re-exported here.
"""
from __future__ import annotations

import math

from pipeline.config import AMP, RESULT_NEUTRAL, Recipe  # noqa: F401  (re-exported)
from pipeline.errors import CleanError

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
