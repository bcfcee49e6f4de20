"""Closed forms for the classifier head (formulas: docs/methods.md §1).

Holds the one-pass forward through a timm-style model (``forward_logits_features``:
``forward_features`` -> ``forward_head(pre_logits=True)`` (= h) -> ``get_classifier()``
(= logits)), the closed-form last-layer norms ‖∇_{W,b} L_i‖ (``last_layer_norms``, no
backward pass), the last-layer gradient vector vec(r ⊗ h) ⊕ r with r = softmax(z) − e_y,
explicitly (``grad_vectors_last``) or through a seeded Gaussian random projection that never
materialises r ⊗ h (``project_last_layer_grads``), and the NORMS / SUBSETS constants.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from pipeline.errors import CleanError

__all__ = [
    "NORMS",
    "SUBSETS",
    "forward_logits_features",
    "last_layer_norms",
    "last_layer_residual",
    "grad_vectors_last",
    "project_last_layer_grads",
]

NORMS = ("l1", "l2", "linf")
SUBSETS = ("last", "weights", "biases", "all")


def _head(model: nn.Module) -> nn.Module:
    if not hasattr(model, "get_classifier"):
        raise CleanError(
            f"{type(model).__name__} has no get_classifier(); gradient scoring needs a timm-style "
            "model (forward_features, forward_head(pre_logits=True), get_classifier)."
        )
    return model.get_classifier()


def forward_logits_features(model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: ``(logits [B, C], h [B, D])`` with h the classifier's input.

    Uses the timm API (``forward_features`` -> ``forward_head(pre_logits=True)`` ->
    ``get_classifier()``). A model without ``forward_head`` but with
    ``get_classifier`` is run as ``model(x)`` with a hook on the classifier's input.
    """
    head = _head(model)
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        feats = model.forward_features(x)
        h = model.forward_head(feats, pre_logits=True)
        logits = head(h)
        return logits, h
    box: List[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda mod, args: box.append(args[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    if len(box) != 1:
        raise CleanError(f"classifier of {type(model).__name__} was called {len(box)} times in one forward")
    return logits, box[0]


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise CleanError(f"unknown gradient norm {norm!r}; choose one of {', '.join(NORMS)}")


def last_layer_residual(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """r = softmax(logits) − onehot(y), shape [B, C] (= ∂L_i/∂logits_i)."""
    r = torch.softmax(logits, dim=1)
    r[torch.arange(r.shape[0], device=r.device), y] -= 1
    return r


def last_layer_norms(
    logits: torch.Tensor,
    h: torch.Tensor,
    y: torch.Tensor,
    norm: str,
    *,
    weight: bool = True,
    bias: bool = True,
) -> torch.Tensor:
    """Per-sample ‖∇_{W,b} L_i‖ of the classifier head in closed form, shape [B].

    With r = softmax(z) − e_y: ∇_W L = r hᵀ, ∇_b L = r. So
    l2 = ‖r‖₂·sqrt(‖h‖₂² + 1), l1 = ‖r‖₁·(‖h‖₁ + 1), linf = ‖r‖∞·max(‖h‖∞, 1).
    ``bias=False`` (head without bias, or frozen bias) drops the "+1" terms;
    ``weight=False`` keeps only the bias part ‖r‖.
    """
    _check_norm(norm)
    r = last_layer_residual(logits.detach(), y)
    h = h.detach().reshape(h.shape[0], -1)
    ord_ = {"l1": 1, "l2": 2, "linf": math.inf}[norm]
    rn = torch.linalg.vector_norm(r, ord=ord_, dim=1)
    hn = torch.linalg.vector_norm(h, ord=ord_, dim=1) if weight else torch.zeros_like(rn)
    if norm == "l2":
        hterm = hn.square() + (1.0 if bias else 0.0) if weight else torch.full_like(rn, 1.0 if bias else 0.0)
        return rn * hterm.sqrt()
    if norm == "l1":
        return rn * (hn + (1.0 if bias else 0.0))
    return rn * (torch.clamp(hn, min=1.0) if bias else hn)


def grad_vectors_last(logits: torch.Tensor, h: torch.Tensor, y: torch.Tensor, *, bias: bool = True) -> torch.Tensor:
    """Explicit last-layer gradient vectors vec(r ⊗ h) ⊕ r, shape [B, C·D (+C)].

    Row-major in (class, feature), i.e. the same layout as the head's weight [C, D],
    followed by the bias gradient r. Only for small C·D; see project_last_layer_grads.
    """
    r = last_layer_residual(logits.detach(), y)
    h = h.detach().reshape(h.shape[0], -1)
    g = (r[:, :, None] * h[:, None, :]).reshape(r.shape[0], -1)
    return torch.cat([g, r], dim=1) if bias else g


_PROJ_BLOCK = 16  # rows of the projection generated per seeded block (fixed: determinism)
_proj_cache: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
_PROJ_CACHE_MAX_ELEMS = 32 * 2**20


def _proj_block(c: int, d: int, seed: int, blk: int, rows: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows [blk*16, blk*16+rows) of the Gaussian projection: P [rows, C, D], Pb [rows, C] (float32, CPU)."""
    s = int(np.random.SeedSequence([int(seed) & (2**63 - 1), c, d, blk]).generate_state(1, dtype=np.uint64)[0])
    gen = torch.Generator(device="cpu").manual_seed(s & (2**63 - 1))
    full = torch.randn(_PROJ_BLOCK, c * d + c, generator=gen, dtype=torch.float32)[:rows]
    return full[:, : c * d].reshape(rows, c, d), full[:, c * d :]


def _projection(c: int, d: int, dim: int, seed: int, dtype, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The whole projection (P [dim, C, D], Pb [dim, C]) scaled by 1/sqrt(dim); cached when small."""
    key = (c, d, dim, int(seed), dtype, str(device))
    hit = _proj_cache.get(key)
    if hit is not None:
        return hit
    ps, pbs = [], []
    for blk in range((dim + _PROJ_BLOCK - 1) // _PROJ_BLOCK):
        rows = min(_PROJ_BLOCK, dim - blk * _PROJ_BLOCK)
        p, pb = _proj_block(c, d, seed, blk, rows)
        ps.append(p)
        pbs.append(pb)
    scale = 1.0 / math.sqrt(dim)
    out = (torch.cat(ps).to(device=device, dtype=dtype) * scale, torch.cat(pbs).to(device=device, dtype=dtype) * scale)
    if dim * c * (d + 1) <= _PROJ_CACHE_MAX_ELEMS:
        if len(_proj_cache) > 8:
            _proj_cache.clear()
        _proj_cache[key] = out
    return out


def _project_rows(r: torch.Tensor, h: torch.Tensor, p: torch.Tensor, pb: Optional[torch.Tensor]) -> torch.Tensor:
    """Σ_{c,d} r[b,c] p[k,c,d] h[b,d] (+ r @ pbᵀ) for rows k of p, in sample chunks → [B, k]."""
    k, c, d = p.shape
    b = r.shape[0]
    pflat = p.reshape(k * c, d)
    out = torch.empty(b, k, dtype=r.dtype, device=r.device)
    chunk = max(1, (16 * 2**20) // max(1, k * c))
    for s in range(0, b, chunk):
        e = min(b, s + chunk)
        m = (h[s:e] @ pflat.T).view(e - s, k, c)  # [b, k, C]
        out[s:e] = torch.einsum("bkc,bc->bk", m, r[s:e])
    if pb is not None:
        out += r @ pb.T
    return out


def project_last_layer_grads(
    r: torch.Tensor, h: torch.Tensor, dim: int, seed: int, *, bias: bool = True
) -> torch.Tensor:
    """Seeded Gaussian random projection of vec(r ⊗ h) ⊕ r to ``dim`` dimensions, [B, dim].

    proj[b, k] = Σ_{c,d} r[b,c] P[k,c,d] h[b,d] + Σ_c r[b,c] Pb[k,c], with P, Pb i.i.d.
    N(0, 1/dim) (Johnson–Lindenstrauss scaling: squared norms are preserved in
    expectation). r ⊗ h is never formed: h @ P costs B·dim·C·D and [B, dim, C] memory
    (done in chunks of samples). P is generated in fixed 16-row blocks, each from
    its own seed derived from (seed, C, D, block), so the result is deterministic
    for a seed and does not depend on the batch size or device; row k of the
    projection is the same for every ``dim`` ≥ k+1. Equals ``grad_vectors_last(...) @
    Pfull.T`` with Pfull = [P.reshape(dim, C·D), Pb]. Small projections
    (dim·C·(D+1) ≤ 32 Mi values) are kept in a cache; larger ones (e.g. an ImageNet
    head) are regenerated block by block on every call, so pass big batches.
    """
    if dim < 1:
        raise CleanError(f"projection dim must be >= 1, got {dim}")
    r = r.detach()
    h = h.detach().reshape(h.shape[0], -1)
    c = r.shape[1]
    d = h.shape[1]
    dtype = r.dtype if r.dtype in (torch.float32, torch.float64) else torch.float32
    r = r.to(dtype)
    h = h.to(dtype)
    if dim * c * (d + 1) <= _PROJ_CACHE_MAX_ELEMS:
        p, pb = _projection(c, d, dim, seed, dtype, r.device)
        return _project_rows(r, h, p, pb if bias else None)
    scale = 1.0 / math.sqrt(dim)
    cols = []
    for blk in range((dim + _PROJ_BLOCK - 1) // _PROJ_BLOCK):
        rows = min(_PROJ_BLOCK, dim - blk * _PROJ_BLOCK)
        p, pb = _proj_block(c, d, seed, blk, rows)
        p = p.to(device=r.device, dtype=dtype) * scale
        pb = pb.to(device=r.device, dtype=dtype) * scale
        cols.append(_project_rows(r, h, p, pb if bias else None))
    return torch.cat(cols, 1)
