"""Model creation (timm registry + our small nets) and safe (pickle-free) weight I/O."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import CleanError
from .io import atomic_path, write_json

SMALL_NETS = {"small_cnn", "small_cnn_bn"}


def create_model(name: str, num_classes: int, in_chans: int, img_size: tuple[int, int],
                 pretrained: bool = False, weights: str | None = None):
    """Create a timm model by name (or one of our small nets) → nn.Module.

    num_classes / in_chans come from the data; img_size = (H, W) is used by nets that
    need it. `pretrained` downloads timm weights unless `weights` names a local file.
    """
    import timm

    from . import nets  # noqa: F401  (registers small_cnn, small_cnn_bn into timm)

    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        hint = f" Similar: {', '.join(close)}." if close else ""
        raise CleanError(f"model.name: unknown model '{name}'. Use a timm model name "
                         f"(e.g. resnet18, efficientnet_b0) or small_cnn / small_cnn_bn.{hint}")
    kwargs = dict(num_classes=num_classes, in_chans=in_chans)
    if name in SMALL_NETS:
        kwargs["img_size"] = tuple(img_size)
        if pretrained:
            raise CleanError(f"model.pretrained: {name} has no pretrained weights; set model.pretrained: false")
    if pretrained and weights:
        if not Path(weights).exists():
            raise CleanError(f"model.weights: file not found: {weights}")
        kwargs["pretrained_cfg_overlay"] = dict(file=str(weights))
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except CleanError:
        raise
    except Exception as e:  # noqa: BLE001 - network / hub failures vary by version
        if pretrained:
            raise CleanError(
                f"model.pretrained: could not load pretrained weights for '{name}' "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). This machine may be offline: "
                "set model.pretrained: false, or download the weights elsewhere and set model.weights: <file>"
            ) from None
        raise CleanError(f"model.name: could not create '{name}' for {in_chans}-channel "
                         f"{img_size[0]}x{img_size[1]} images with {num_classes} classes "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def save_weights(model, path: str | Path, metadata: dict | None = None) -> None:
    """Save a state dict as safetensors (atomic). metadata values are stringified."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_weights(model, path: str | Path) -> None:
    """Load safetensors weights into `model` (strict; no pickle)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise CleanError(f"weights not found: {path}; run `clean train` first")
    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001
        raise CleanError(f"{path}: not a readable safetensors file ({e}); retrain with `clean train`") from None
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise CleanError(f"{path}: weights do not fit the model (shape mismatch: {'; '.join(wrong[:2])}); "
                         "the data's class count or input channels differ from the ones it was trained on")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CleanError(f"{path}: weights do not fit the model (missing {list(missing)[:3]}, "
                         f"unexpected {list(unexpected)[:3]}); was it trained with another model.name?")


def load_trained(model_dir: str | Path, device: str = "cpu"):
    """Load `model_dir/model.safetensors` + `config.json` → (model in eval mode, config dict)."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.exists():
        raise CleanError(f"{cfg_path} not found; train a model first: clean train --out {model_dir}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CleanError(f"{cfg_path}: not valid JSON ({e}); retrain with `clean train`") from None
    model = create_model(cfg["model"], cfg["num_classes"], cfg["in_chans"], tuple(cfg["image_size"]))
    load_weights(model, model_dir / "model.safetensors")
    return model.to(device).eval(), cfg


def write_config(model_dir: str | Path, cfg: dict) -> None:
    write_json(Path(model_dir) / "config.json", cfg)
