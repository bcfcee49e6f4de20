"""Training state for `clean train --resume`, pickle-free: safetensors for tensors, JSON for the rest.

A state folder holds `state_<epoch>.safetensors` (model weights `model/<name>`, optimizer
tensors `optim/<param index>/<key>`, RNG states `rng/...`, the dynamics rows recorded so far
`dyn/<name>` [epochs done, N]) and `state.json` (epoch, history, checkpoint list, optimizer
param groups and scalar state, numpy RNG scalars, GradScaler state). `state.json` is written
last and names its tensor file, so the newest *complete* state is always the one it names.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.errors import CleanError
from pipeline.io import atomic_path, write_json
from pipeline.models import canonical_header

STATE_JSON = "state.json"
FORMAT = 1
DYN_KEYS = ("loss", "margin", "p_label", "correct", "track_grad_norm")
#: dynamics that accumulate over epochs (saved and restored whole, not per epoch)
DYN_SUMS = ("probs_sum",)


def rng_states() -> dict:
    """This process's global RNG states: torch CPU and (when in use) the current CUDA device's."""
    import torch

    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def capture(model, opt, scaler, gen, dyn: dict | None, epoch: int, history: list, ckpts: list,
            rng_by_rank: list | None = None) -> tuple[dict, dict]:
    """The state after `epoch` epochs → (tensors {key: CPU tensor}, JSON-able dict).

    `rng_by_rank` = every rank's `rng_states()` (torchrun; dropout draws differ per rank),
    else this process's.
    """
    import torch

    tensors = {f"model/{k}": v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    osd = opt.state_dict()
    opt_state = {}
    for pid, st in osd["state"].items():
        scalars, names = {}, []
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim/{pid}/{k}"] = v.detach().cpu().clone().contiguous()
                names.append(k)
            else:
                scalars[k] = v
        opt_state[str(pid)] = {"tensors": names, "scalars": scalars}
    for r, states in enumerate(rng_by_rank or [rng_states()]):
        for kind, s in states.items():
            tensors[f"rng/{kind}/{r}"] = s.clone()
    tensors["rng/perm"] = gen.get_state().clone()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(np.asarray(keys, np.int64))
    if dyn is not None:
        for k in DYN_KEYS:
            tensors[f"dyn/{k}"] = torch.from_numpy(np.ascontiguousarray(dyn[k][:epoch]))
        for k in DYN_SUMS:
            tensors[f"dyn/{k}"] = torch.from_numpy(np.ascontiguousarray(dyn[k]))
    meta = {"format": FORMAT, "epoch": int(epoch), "history": history, "checkpoints": ckpts,
            "optimizer": {"param_groups": osd["param_groups"], "state": opt_state},
            "scaler": scaler.state_dict() if scaler is not None else None,
            "numpy_rng": {"name": name, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "ranks": len(rng_by_rank or [0])}
    return tensors, meta


def save(state_dir: str | Path, tensors: dict, meta: dict) -> None:
    """Write one state atomically: tensors first, then state.json naming them; drop older tensors."""
    from safetensors.torch import save_file

    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    name = f"state_{meta['epoch']:03d}.safetensors"
    with atomic_path(state_dir / name) as tmp:
        save_file(tensors, str(tmp), metadata={"format": str(FORMAT), "epoch": str(meta["epoch"])})
        canonical_header(tmp)  # sorted metadata keys: identical states give identical bytes
    write_json(state_dir / STATE_JSON, {**meta, "file": name})
    for old in state_dir.glob("state_*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load(state_dir: str | Path) -> tuple[dict, dict] | None:
    """The newest complete state in `state_dir` → (tensors, meta), or None when there is none."""
    from safetensors.torch import load_file

    state_dir = Path(state_dir)
    js = state_dir / STATE_JSON
    if not js.exists():
        return None
    fix = "run `clean train` without --resume to start over"
    try:
        meta = json.loads(js.read_text())
        tensors = load_file(str(state_dir / meta["file"]))
    except Exception as e:  # noqa: BLE001 - damaged or foreign files
        raise CleanError(f"{state_dir}: the saved training state is unreadable ({type(e).__name__}: {e}); {fix}") from None
    if meta.get("format") != FORMAT:
        raise CleanError(f"{js}: unknown state format {meta.get('format')!r}; {fix}")
    return tensors, meta


def restore(tensors: dict, meta: dict, model, opt, scaler, gen, dyn: dict | None, rank: int = 0) -> None:
    """Put a loaded state back into model, optimizer, scaler, RNGs and the dynamics arrays."""
    import torch

    model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
    osd = {"param_groups": meta["optimizer"]["param_groups"], "state": {}}
    for pid, st in meta["optimizer"]["state"].items():
        entry = dict(st["scalars"])
        for k in st["tensors"]:
            entry[k] = tensors[f"optim/{pid}/{k}"]
        osd["state"][int(pid)] = entry
    opt.load_state_dict(osd)
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    r = rank if f"rng/torch/{rank}" in tensors else 0  # resumed with more processes: rank 0's
    torch.set_rng_state(tensors[f"rng/torch/{r}"])
    if f"rng/cuda/{r}" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"rng/cuda/{r}"])
    gen.set_state(tensors["rng/perm"])
    nr = meta["numpy_rng"]
    np.random.set_state((nr["name"], tensors["rng/numpy"].numpy().astype(np.uint32), nr["pos"], nr["has_gauss"],
                         nr["cached_gaussian"]))
    if dyn is not None:
        e = meta["epoch"]
        for k in DYN_KEYS:
            dyn[k][:e] = tensors[f"dyn/{k}"].numpy()
        for k in DYN_SUMS:
            if f"dyn/{k}" in tensors:
                dyn[k][...] = tensors[f"dyn/{k}"].numpy()
