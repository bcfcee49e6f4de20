"""Model creation (timm registry + our small nets) and safe (pickle-free) weight I/O."""
from __future__ import annotations

import json
import math
import os
import socket
import struct
import threading
from pathlib import Path
from urllib.parse import urlparse

from pipeline.errors import CleanError
from pipeline.formats.jsonfile import read_json
from pipeline.formats.manifest import classes_path_for, read_classes
from pipeline.io import atomic_path, write_json


def create_model(name: str, num_classes: int, in_chans: int, img_size: tuple[int, int],
                 pretrained: bool = False, weights: str | None = None):
    """Create a timm model by name (or one of our small nets) → nn.Module.

    num_classes / in_chans come from the data; img_size = (H, W) is used by nets that
    need it. `pretrained` downloads timm weights unless `weights` names a local file.
    """
    from pipeline import nets

    if name in nets.SMALL_NETS:  # built directly: no timm import (~2 s per process) for the small nets
        if pretrained:
            raise CleanError(f"model.pretrained: {name} has no pretrained weights; set model.pretrained: false")
        if weights:
            raise CleanError(f"model.weights is set ({weights}) but {name} has no pretrained weights: set "
                             "model.weights: null, or use a timm model name for that checkpoint")
        try:
            return nets.BUILDERS[name](num_classes=num_classes, in_chans=in_chans, img_size=tuple(img_size))
        except Exception as e:  # noqa: BLE001 - e.g. images too small for two poolings
            raise CleanError(f"model.name: could not create '{name}' for {in_chans}-channel "
                             f"{img_size[0]}x{img_size[1]} images with {num_classes} classes "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    import timm

    nets.register_with_timm()
    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        hint = f" Similar: {', '.join(close)}." if close else ""
        raise CleanError(f"model.name: unknown model '{name}'. Use a timm model name "
                         f"(e.g. resnet18, efficientnet_b0) or small_cnn / small_cnn_bn.{hint}")
    kwargs = dict(num_classes=num_classes, in_chans=in_chans)
    if getattr(timm.models.get_pretrained_cfg(name), "fixed_input_size", False):
        kwargs["img_size"] = tuple(img_size)  # ViT-like nets: position embeddings for the data's size (resized on load)
    if weights and not pretrained:
        raise CleanError(f"model.weights is set ({weights}) but model.pretrained is false: set model.pretrained: "
                         "true to start from that file, or model.weights: null")
    if pretrained and weights:
        if not Path(weights).is_file():
            raise CleanError(f"model.weights: file not found: {weights}; give a timm checkpoint of {name} "
                             f"(.safetensors, or a torch state dict .pth/.bin)")
    elif pretrained:
        weights = _cached_or_offline(name)
    if pretrained and weights:
        # timm's own loader: safetensors or a torch state dict (weights_only); a head of another class count is
        # re-initialised, the input conv adapted to in_chans, position embeddings resized (ViT filter fns)
        kwargs["pretrained_cfg_overlay"] = dict(file=str(weights))
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
        if pretrained and weights:
            _check_loaded(model, name, weights)
        return model
    except CleanError:
        raise
    except Exception as e:  # noqa: BLE001 - network / hub failures vary by version
        if pretrained and weights:
            raise CleanError(
                f"model.weights: cannot load {weights} into '{name}' ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else ''}); give a checkpoint of this architecture in "
                "timm's formats: .safetensors, or a torch state dict (.pth / .bin, written by torch.save of model.state_dict())"
            ) from None
        if pretrained:
            raise CleanError(
                f"model.pretrained: could not load pretrained weights for '{name}' "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). This machine may be offline: "
                "set model.pretrained: false, or download the weights elsewhere and set model.weights: <file>"
            ) from None
        raise CleanError(f"model.name: could not create '{name}' for {in_chans}-channel "
                         f"{img_size[0]}x{img_size[1]} images with {num_classes} classes "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def _check_loaded(model, name: str, weights) -> None:
    """CleanError unless the checkpoint `weights` covered every tensor of `model` but its
    classifier (timm loads non-strictly when the head is replaced, so a checkpoint of another
    architecture would otherwise leave layers silently random)."""
    from timm.models import load_state_dict

    if str(weights).endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            have = set(f.keys())
    else:
        have = set(load_state_dict(str(weights)))
    heads = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    own = set(model.state_dict())
    missing = sorted(k for k in own - have if not any(k.startswith(h + ".") for h in heads))
    unexpected = sorted(k for k in have - own if not any(k.startswith(h + ".") for h in heads))
    if missing or unexpected:
        raise CleanError(f"model.weights: {weights} does not fit '{name}' ({len(missing)} of its tensors missing, e.g. "
                         f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}); give a checkpoint "
                         "of this architecture in timm's own format (.safetensors or a torch state dict)")


def _reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether `host` resolves within `timeout` s (a quick offline test, before a hub's slow retries)."""

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    ok: list[bool] = []

    def probe():
        try:
            socket.getaddrinfo(host, 443)
            ok.append(True)
        except OSError:
            ok.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok and ok[0])


def _cached_or_offline(name: str) -> str | None:
    """`model.pretrained: true` without model.weights: the weights file already in the hub /
    torch cache (no network needed), None to let timm download it, or a CleanError when they
    are not cached and the hub cannot be reached (instead of a minute of retries)."""

    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    cfg = cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else (cfg or {})
    hub, url = cfg.get("hf_hub_id"), cfg.get("url")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache

            for fname in ("model.safetensors", "pytorch_model.bin"):
                got = try_to_load_from_cache(hub, fname)
                if isinstance(got, str) and os.path.isfile(got):
                    return got
        except Exception:  # noqa: BLE001 - an unusual cache layout: let timm try
            pass
        host = "huggingface.co"
    elif url:
        import torch

        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
        if os.path.isfile(cached):
            return cached
        host = urlparse(url).hostname or ""
    else:
        return None  # timm says why there are no weights
    if not _reachable(host):
        raise CleanError(f"model.pretrained: true but the weights of '{name}' are not downloaded and {host} cannot "
                         "be reached (offline?): set model.weights to a local checkpoint file (a timm .safetensors, "
                         "or a torch state dict .pth/.bin), or set model.pretrained: false")
    return None


def save_weights(model, path: str | Path, metadata: dict | None = None) -> None:
    """Save a state dict as safetensors (atomic). metadata values are stringified."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
        canonical_header(tmp)


def canonical_header(path: str | Path) -> None:
    """Rewrite a safetensors file's JSON header in place with sorted keys.

    safetensors writes its metadata map in a random order (a Rust HashMap), so the same weights
    would give different bytes; sorted keys make the file a function of its content. The header
    keeps its length (same keys and values), so tensor offsets are untouched.
    """

    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        header = json.loads(raw)
        new = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(new) <= n and new != raw.rstrip(b" "):
            f.seek(8)
            f.write(new + b" " * (n - len(new)))


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
    import torch

    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        more = f" and {len(broken) - 1} more" if len(broken) > 1 else ""
        raise CleanError(f"{path}: the weights hold NaN/inf values ({broken[0]}{more}); training diverged: "
                         "retrain with a lower train.lr")
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


# what a model folder's config.json must hold (written by `clean train`) and the JSON type of each
CONFIG_KEYS = {"model": str, "num_classes": int, "classes": list, "in_chans": int, "image_size": list,
               "mean": list, "std": list}


def read_config(model_dir: str | Path) -> dict:
    """Read and check `model_dir/config.json` → dict; CleanError naming the file and the fix."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    fix = f"retrain it: clean train --out {model_dir}"

    cfg = read_json(cfg_path, f"not found; train a model first: clean train --out {model_dir}", fix)
    if not isinstance(cfg, dict):
        raise CleanError(f"{cfg_path}: expected a JSON object with {', '.join(CONFIG_KEYS)}; {fix}")
    for key, kind in CONFIG_KEYS.items():
        v = cfg.get(key)
        if not isinstance(v, kind) or isinstance(v, bool):
            what = "missing" if key not in cfg else f"{v!r} is not a {kind.__name__}"
            raise CleanError(f"{cfg_path}: '{key}' {what}; {fix}")
    if (cfg["num_classes"] != len(cfg["classes"]) or cfg["in_chans"] not in (1, 3)
            or len(cfg["image_size"]) != 2 or len(cfg["mean"]) != cfg["in_chans"] or len(cfg["std"]) != cfg["in_chans"]):
        raise CleanError(f"{cfg_path}: inconsistent config (num_classes {cfg['num_classes']} vs {len(cfg['classes'])} "
                         f"class names, in_chans {cfg['in_chans']}, image_size {cfg['image_size']}); {fix}")
    _check_numbers(cfg, cfg_path, fix)
    return cfg


def _check_numbers(cfg: dict, cfg_path: Path, fix: str) -> None:
    """The numbers every prediction divides or resizes by: image_size positive integers, mean
    finite, std finite and > 0 (a std of 0 or NaN makes every input, hence every score, NaN)."""

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    size = cfg["image_size"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise CleanError(f"{cfg_path}: 'image_size' must be two positive integers [H, W], got {size!r}; {fix}")
    if not all(number(v) for v in cfg["mean"]):
        raise CleanError(f"{cfg_path}: 'mean' must hold finite numbers, got {cfg['mean']!r}; {fix}")
    if not all(number(v) and v > 0 for v in cfg["std"]):
        raise CleanError(f"{cfg_path}: 'std' must hold finite numbers > 0, got {cfg['std']!r}; {fix}")


def check_fits_data(cfg: dict, manifest: str | Path, model_dir: str | Path) -> None:
    """CleanError unless the model's classes and input channels are those of the data.

    The data's are in classes.json next to the manifest (skipped when there is none).
    """

    cpath = classes_path_for(manifest)
    if not cpath.exists():
        return
    info = read_classes(cpath)
    have, want = list(info["classes"]), list(cfg["classes"])

    def shown(names):
        return ", ".join(map(str, names[:5])) + (", ..." if len(names) > 5 else "")

    if have != want:
        what = (f"{len(want)} classes ({shown(want)})" if len(have) != len(want) else f"classes {shown(want)}")
        raise CleanError(f"{model_dir} was trained on {what} but {cpath} has {len(have)} ({shown(have)}); "
                         f"use a model trained on this data (clean train --manifest {manifest})")
    ch = info.get("in_chans")
    if isinstance(ch, int) and not isinstance(ch, bool) and ch != cfg["in_chans"]:
        kind = {1: "grayscale", 3: "color"}
        raise CleanError(f"{model_dir} expects {cfg['in_chans']}-channel ({kind.get(cfg['in_chans'], '?')}) images but "
                         f"{cpath} says the data has {ch}-channel ({kind.get(ch, '?')}) images; use a model trained "
                         f"on this data (clean train --manifest {manifest})")


def load_trained(model_dir: str | Path, device: str = "cpu"):
    """Load `model_dir/model.safetensors` + `config.json` → (model in eval mode, config dict)."""
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    model = create_model(cfg["model"], cfg["num_classes"], cfg["in_chans"], tuple(cfg["image_size"]))
    load_weights(model, model_dir / "model.safetensors")
    return model.to(device).eval(), cfg


def write_config(model_dir: str | Path, cfg: dict) -> None:
    """model_dir/config.json: what :func:`load_trained` / :func:`read_config` read back (atomic)."""
    write_json(Path(model_dir) / "config.json", cfg)


def run_dirs(model_dir: str | Path) -> list[Path]:
    """The model folder plus its other-seed runs (model_dir/seeds/seed_<s>), in seed order."""
    model_dir = Path(model_dir)
    extra = sorted((model_dir / "seeds").glob("seed_*"), key=lambda p: int(p.name.split("_")[1])) \
        if (model_dir / "seeds").exists() else []
    return [model_dir] + [p for p in extra if (p / "config.json").exists()]
