"""Device selection: `auto` picks CUDA when present, else CPU."""
from __future__ import annotations

from pipeline.errors import CleanError


def resolve_device(name: str) -> str:
    """'auto' | 'cpu' | 'cuda' → a torch device string; CleanError if CUDA is asked but absent."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CleanError("train.device = cuda but no CUDA GPU is visible; use device: auto or cpu")
    if name not in ("cpu", "cuda"):
        raise CleanError(f"device {name!r} is not allowed; use auto, cpu or cuda")
    return name
