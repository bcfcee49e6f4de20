"""Per-sample gradient norms without a per-sample loop (METHODS.md §1).

Public API
----------
``forward_logits_features(model, x) -> (logits [B, C], h [B, D])``
    One forward pass through a timm-style model: ``forward_features`` ->
    ``forward_head(pre_logits=True)`` (= h) -> ``get_classifier()`` (= logits).

``last_layer_norms(logits, h, y, norm) -> [B]``
    Closed form of ‖∇_{W,b} L_i‖ for the classifier head, no backward pass.

``per_sample_grad_norms(model, x, y, norm="l2", params="all") -> dict``
    ``{"loss": [B], "logits": [B, C], "h": [B, D], "grad_norm": [B]}`` where
    ``grad_norm[i] = ‖∇_θ' L_i‖_norm`` for the per-sample cross-entropy L_i and
    the parameter subset θ'.

``last_layer_residual``, ``grad_vectors_last``, ``project_last_layer_grads``
    The last-layer gradient vector vec(r ⊗ h ⊕ r), r = softmax(z) − e_y, explicitly
    (small problems) or through a seeded Gaussian random projection that never
    materialises r ⊗ h.

Parameter subsets (``params``)
------------------------------
Only parameters with ``requires_grad=True`` ever count.

* ``last``    – the classifier head returned by ``model.get_classifier()`` (W and b).
* ``weights`` – every parameter whose *own name* (the part after the last ".") ends
  in ``weight``: conv / linear kernels, BatchNorm/LayerNorm/GroupNorm scales,
  ``in_proj_weight`` …  Layer-scale ``gamma``, ``pos_embed``, ``cls_token`` and the
  like are *not* weights.
* ``biases``  – every parameter whose own name ends in ``bias``.
* ``all``     – every parameter.

Norms: ``l2`` = sqrt(Σ over tensors of squared l2), ``l1`` = Σ of l1, ``linf`` =
max of linf, i.e. the norm of the flattened concatenated gradient.

How each layer is computed ("paths")
------------------------------------
One forward pass with hooks, then ONE backward of Σ_i L_i that only produces
activation gradients: parameters are temporarily set to ``requires_grad=False`` (no
parameter gradient is ever formed), and the output of the first leaf module applied
to the raw input becomes the autograd root ("root mode"), so — like a training step —
no gradient w.r.t. the input image is computed. (If no leaf module consumes the raw
input, or a root is modified in place, the pass is redone with a copied root or with
the input requiring grad.) Because the model is in eval mode every sample is
independent, so the gradient reaching a layer's output for sample i is exactly
∂L_i/∂out_i. A forward hook keeps each layer's input; a tensor hook on its output
receives the output gradient, and the layer's per-sample norms are computed right
there during the backward, after which both are released. Per layer type (exact
types only — subclasses that override ``forward`` are not trusted):

* ``linear-rank1``  nn.Linear on [B, in]: per-sample grad is g aᵀ (rank one) so
  ‖·‖₂ = ‖g‖₂‖a‖₂, ‖·‖₁ = ‖g‖₁‖a‖₁, ‖·‖∞ = ‖g‖∞‖a‖∞ exactly; bias grad = g.
* ``linear-ghost`` / ``linear-mat``  nn.Linear on [B, T, in] (any number of middle
  dims): l2 via the ghost Gram identity ‖Σ_t g_t a_tᵀ‖²_F = Σ_{t,s}(a_t·a_s)(g_t·g_s)
  when that is cheaper (T·(in+out) < in·out); otherwise (and always for l1/linf)
  the per-sample gradient gᵀa is built in cache-sized blocks (sample chunks, and
  output-row blocks when one sample's gradient exceeds the tile), reduced to the
  norm statistic and freed. Bias grad = Σ_t g_t.
* ``conv-rank1`` / ``conv-ghost`` / ``conv-mat``  nn.Conv1d / nn.Conv2d (any stride,
  padding incl. "same" and non-zero padding modes, dilation, groups): the input is
  unfolded (an as_strided view + copy; F.unfold's CPU im2col is 20-100× slower) to
  A [b, G, p, T] per group, the output gradient reshaped to [b, G, d, T], and the
  weight gradient is block-diagonal over groups. One output position (T = 1) is
  rank one (exact for every norm); otherwise ghost-vs-materialise as for Linear.
* ``norm``  BatchNorm1d/2d/3d (eval: running statistics), LayerNorm (incl. timm's
  ``LayerNorm`` and channels-first ``LayerNorm2d``), GroupNorm, and timm's fused
  norm+activation layers (``BatchNormAct2d``, ``GroupNormAct``, ``GroupNorm1Act``,
  ``LayerNormAct``, ``LayerNormAct2d``: the norm's output gradient is caught at the
  entry of their ``drop`` child): per-sample grad of the weight = Σ_positions g·x̂,
  of the bias = Σ_positions g, x̂ recomputed from the captured input and the
  layer's statistics.
* ``local-func``  any other module with direct trainable parameters (timm
  layer-scale ``gamma``, a ConvNeXt block's ``gamma``, custom layers, MHA's
  ``in_proj_*``…): the module alone is re-run per sample with
  ``torch.func.vmap(grad(...))`` on its captured inputs, differentiating
  ⟨module(inputs_i), g_i⟩ w.r.t. its direct parameters only.
* ``global-func``  parameters whose module is never called during the forward
  (e.g. ``pos_embed``/``cls_token`` used in the root model's own methods,
  ``out_proj`` of nn.MultiheadAttention) or whose output does not depend on the
  input: the whole model is re-run with ``torch.func.vmap(grad(...))`` restricted
  to those parameters.
* ``last-closed-form``  the ``last`` subset with an nn.Linear head: one no-grad
  forward and the closed form from (logits, h); no backward at all.

``per_sample_grad_norms(..., details=True)`` reports the path each module took.
A module called several times in one forward (shared weights) has its calls
concatenated along T (Linear/conv) or summed (norms). If a captured input is later
modified in place (version counter changed) the affected layers are recomputed in a
second pass that clones their inputs. Limitation: a parameter used *functionally*
outside the module that owns it (weight tying) is only seen through that module.
"""
from __future__ import annotations

import math
import weakref
from functools import partial
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.errors import CleanError

__all__ = [
    "NORMS",
    "SUBSETS",
    "forward_logits_features",
    "last_layer_norms",
    "last_layer_residual",
    "per_sample_grad_norms",
    "grad_vectors_last",
    "project_last_layer_grads",
    "param_subset",
]

NORMS = ("l1", "l2", "linf")
SUBSETS = ("last", "weights", "biases", "all")

_CONV_TYPES = (nn.Conv1d, nn.Conv2d)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Subclasses whose forward is semantically identical to their torch base class
# (checked against timm 1.0 source); keyed by "module.qualname".
_TIMM_LINEAR = {"timm.layers.linear.Linear"}
_TIMM_LN_LAST = {"timm.layers.norm.LayerNorm"}  # normalises over trailing dims, like nn.LayerNorm
_TIMM_LN_CF = {"timm.layers.norm.LayerNorm2d"}  # channels-first: normalises over dim 1 of NCHW
# timm norm + activation layers: forward = norm → self.drop → self.act. The norm's output
# is the input of ``self.drop``, so its gradient is caught with a pre-hook on ``drop``.
_TIMM_NORM_ACT = {
    "timm.layers.norm_act.BatchNormAct2d": "bn",
    "timm.layers.norm_act.GroupNormAct": "gn",
    "timm.layers.norm_act.GroupNorm1Act": "gn",
    "timm.layers.norm_act.LayerNormAct": "ln",
    "timm.layers.norm_act.LayerNormAct2d": "ln2d",
}


def _qualname(m: nn.Module) -> str:
    t = type(m)
    return f"{t.__module__}.{t.__qualname__}"


def _layer_kind(m: nn.Module) -> str:
    """Which fast path a module takes ('linear', 'conv', 'bn', 'ln', 'ln2d', 'gn'), or 'local'."""
    t = type(m)
    q = _qualname(m)
    if t is nn.Linear or q in _TIMM_LINEAR:
        return "linear"
    if t in _CONV_TYPES:
        return "conv"
    if t in _BN_TYPES:
        return "bn"
    if t is nn.LayerNorm or q in _TIMM_LN_LAST:
        return "ln"
    if q in _TIMM_LN_CF:
        return "ln2d"
    if t is nn.GroupNorm:
        return "gn"
    if q in _TIMM_NORM_ACT and isinstance(getattr(m, "drop", None), nn.Module):
        return "act-" + _TIMM_NORM_ACT[q]
    return "local"


# --------------------------------------------------------------------------------------
# Forward pass and the closed-form last layer
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# Parameter subsets
# --------------------------------------------------------------------------------------
def param_subset(model: nn.Module, params: str) -> Dict[str, nn.Parameter]:
    """Named trainable parameters in subset ``params`` (see module docstring)."""
    if params not in SUBSETS:
        raise CleanError(f"unknown parameter subset {params!r}; choose one of {', '.join(SUBSETS)}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params == "all":
        return dict(named)
    if params == "weights":
        return {n: p for n, p in named if n.rsplit(".", 1)[-1].endswith("weight")}
    if params == "biases":
        return {n: p for n, p in named if n.rsplit(".", 1)[-1].endswith("bias")}
    head_ids = {id(p) for p in _head(model).parameters()}
    return {n: p for n, p in named if id(p) in head_ids}


# --------------------------------------------------------------------------------------
# Norm accumulation
# --------------------------------------------------------------------------------------
class _Acc:
    """Per-sample accumulator: l2 keeps Σ squares, l1 Σ, linf max."""

    def __init__(self, norm: str, n: int, dtype, device, keep_per_param: bool):
        self.norm = norm
        self.total = torch.zeros(n, dtype=dtype, device=device)
        self.per_param: Optional[Dict[str, torch.Tensor]] = {} if keep_per_param else None

    def add(self, name: str, stat: torch.Tensor) -> None:
        stat = stat.detach().to(self.total.dtype)
        if self.norm == "linf":
            torch.maximum(self.total, stat, out=self.total)
        else:
            self.total += stat
        if self.per_param is not None:
            cur = self.per_param.get(name)
            if cur is None:
                self.per_param[name] = stat.clone()
            else:
                self.per_param[name] = torch.maximum(cur, stat) if self.norm == "linf" else cur + stat

    def finish(self) -> torch.Tensor:
        return self.total.sqrt() if self.norm == "l2" else self.total

    def finish_per_param(self) -> Dict[str, torch.Tensor]:
        if self.per_param is None:
            return {}
        if self.norm == "l2":
            return {k: v.sqrt() for k, v in self.per_param.items()}
        return dict(self.per_param)


def _stat(t: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample statistic of a [b, ...] tensor: l2 → Σ squares, l1 → Σ|·|, linf → max|·|."""
    t = t.reshape(t.shape[0], -1)
    if norm == "l2":
        return torch.linalg.vector_norm(t, ord=2, dim=1).square()
    if norm == "l1":
        return t.abs().sum(1)
    return t.abs().amax(1)  # (much faster than vector_norm(ord=inf) on CPU)


# --------------------------------------------------------------------------------------
# Per-layer computations (each receives all calls of one module: inputs a_k, output grads g_k)
# --------------------------------------------------------------------------------------
_TILE_BYTES = 2 * 2**20  # per-chunk working set aimed at the L2 cache


class _Ctx:
    def __init__(self, norm: str, acc: _Acc, budget_bytes: int, paths: Optional[Dict[str, str]]):
        self.norm = norm
        self.acc = acc
        self.budget = budget_bytes
        self.tile = _TILE_BYTES
        self.paths = paths

    def path(self, name: str, p: str) -> None:
        if self.paths is not None:
            self.paths[name] = p


def _chunks(n: int, per_sample_elems: int, elem_size: int, budget: int, tile: int = 0):
    """Sample slices whose temporaries fit ``tile`` bytes (cache) when given, else ``budget``."""
    cap = min(budget, tile) if tile else budget
    step = max(1, int(cap // max(1, per_sample_elems * elem_size)))
    for s in range(0, n, step):
        yield slice(s, min(n, s + step))


def _dblock(groups: int, d: int, p: int, elem_size: int, tile: int) -> int:
    """Output rows per block so that one sample's per-sample-gradient block fits ``tile`` bytes."""
    return max(1, min(d, int(tile // max(1, groups * p * elem_size))))


def _cat(parts: List[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _combine(prev: Optional[torch.Tensor], new: torch.Tensor, norm: str) -> torch.Tensor:
    if prev is None:
        return new
    return torch.maximum(prev, new) if norm == "linf" else prev + new


def _gram_sq(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Σ over leading group dims of ‖G Aᵀ‖²_F via Grams. A [b, *, p, T], G [b, *, d, T] → [b]."""
    ga = torch.matmul(A.transpose(-1, -2), A)
    gg = torch.matmul(G.transpose(-1, -2), G)
    return (ga * gg).reshape(ga.shape[0], -1).sum(1)


def _unfold(x: torch.Tensor, k, dil, pad, stride) -> torch.Tensor:
    """F.unfold(x, k, dilation, padding, stride) → [b, C·kh·kw, T], via an as_strided view + one copy.

    (F.unfold's CPU im2col is 20-100× slower than this strided copy.)
    """
    if pad[0] or pad[1]:
        x = F.pad(x, (pad[1], pad[1], pad[0], pad[0]))
    b, c, hh, ww = x.shape
    ho = (hh - dil[0] * (k[0] - 1) - 1) // stride[0] + 1
    wo = (ww - dil[1] * (k[1] - 1) - 1) // stride[1] + 1
    sb, sc, sh, sw = x.stride()
    v = x.as_strided((b, c, k[0], k[1], ho, wo), (sb, sc, dil[0] * sh, dil[1] * sw, stride[0] * sh, stride[1] * sw))
    return v.reshape(b, c * k[0] * k[1], ho * wo)


def _unfold_conv_input(m: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple, Tuple, Tuple, Tuple]:
    """Return (x4d, kernel, dilation, padding, stride) ready for F.unfold (explicit padding applied)."""
    if isinstance(m, nn.Conv1d):
        x = x.unsqueeze(2)
        k, d, s = (1, m.kernel_size[0]), (1, m.dilation[0]), (1, m.stride[0])
        pad = (0, 0) if isinstance(m.padding, str) else (0, m.padding[0])
    else:
        k, d, s = tuple(m.kernel_size), tuple(m.dilation), tuple(m.stride)
        pad = (0, 0) if isinstance(m.padding, str) else tuple(m.padding)
    if isinstance(m.padding, str) or m.padding_mode != "zeros":
        rp = list(m._reversed_padding_repeated_twice)
        if isinstance(m, nn.Conv1d):
            rp = rp + [0, 0]
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        if any(rp):
            x = F.pad(x, rp, mode=mode)
        pad = (0, 0)
    return x, k, d, pad, s


def _do_linear(ctx: _Ctx, name: str, m: nn.Linear, calls, want: Dict[str, str]) -> None:
    norm = ctx.norm
    aa = [a.reshape(a.shape[0], -1, a.shape[-1]) for a, _ in calls]
    gg = [g.reshape(g.shape[0], -1, g.shape[-1]) for _, g in calls]
    b = aa[0].shape[0]
    a = aa[0] if len(aa) == 1 else torch.cat(aa, 1)
    g = gg[0] if len(gg) == 1 else torch.cat(gg, 1)
    T, p, d = a.shape[1], a.shape[2], g.shape[2]
    if "bias" in want:
        ctx.acc.add(want["bias"], _stat(g.sum(1) if T > 1 else g[:, 0], norm))
    if "weight" not in want:
        return
    wname = want["weight"]
    if T == 1:
        ctx.path(name, "linear-rank1")
        ctx.acc.add(wname, _rank1_stat(g[:, :1], a[:, :1], norm))
        return
    esz = a.element_size()
    if norm == "l2" and T * (p + d) < p * d:
        ctx.path(name, "linear-ghost")
        parts = [
            _gram_sq(a[sl].transpose(1, 2), g[sl].transpose(1, 2))
            for sl in _chunks(b, 2 * T * T, esz, ctx.budget, ctx.tile)
        ]
        ctx.acc.add(wname, _cat(parts))
        return
    ctx.path(name, "linear-mat")
    dblk = _dblock(1, d, p, esz, ctx.tile)
    parts = []
    for sl in _chunks(b, dblk * p, esz, ctx.budget, ctx.tile):
        gt = g[sl].transpose(1, 2)
        st = None
        for d0 in range(0, d, dblk):
            st = _combine(st, _stat(torch.bmm(gt[:, d0 : d0 + dblk], a[sl]), norm), norm)
        parts.append(st)
    ctx.acc.add(wname, _cat(parts))


def _rank1_stat(g: torch.Tensor, a: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample stat of Σ_groups g_G a_Gᵀ (one position): g [b, G, d], a [b, G, p] → [b]."""
    if norm == "l2":
        gn = torch.linalg.vector_norm(g, 2, dim=-1).square()
        return (gn * torch.linalg.vector_norm(a, 2, dim=-1).square()).sum(1)
    if norm == "l1":
        return (g.abs().sum(-1) * a.abs().sum(-1)).sum(1)
    return (g.abs().amax(-1) * a.abs().amax(-1)).amax(1)


def _do_conv(ctx: _Ctx, name: str, m: nn.Module, calls, want: Dict[str, str]) -> None:
    norm = ctx.norm
    b = calls[0][0].shape[0]
    G = m.groups
    cout = m.out_channels
    dg = cout // G
    if "bias" in want:
        gsum = sum(g.reshape(b, cout, -1).sum(-1) for _, g in calls)
        ctx.acc.add(want["bias"], _stat(gsum, norm))
    if "weight" not in want:
        return
    wname = want["weight"]
    prepared = [(_unfold_conv_input(m, a), g) for a, g in calls]
    T = sum(int(np.prod(g.shape[2:])) for _, g in calls)
    pg = (m.in_channels // G) * int(np.prod(m.kernel_size))
    esz = calls[0][0].element_size()

    def unfolded(sl):
        As, Gs = [], []
        for (x4, k, dil, pad, st), g in prepared:
            A = _unfold(x4[sl], k, dil, pad, st)  # [b, Cin*k, L]
            As.append(A.view(A.shape[0], G, pg, -1))
            Gs.append(g[sl].reshape(A.shape[0], G, dg, -1))
        if len(As) == 1:
            return As[0], Gs[0]
        return torch.cat(As, -1), torch.cat(Gs, -1)

    if T == 1:  # one output position: per-sample gradient is rank one per group
        ctx.path(name, "conv-rank1")
        parts = []
        for sl in _chunks(b, G * pg, esz, ctx.budget, ctx.tile):
            A, Gm = unfolded(sl)
            parts.append(_rank1_stat(Gm[..., 0], A[..., 0], norm))
        ctx.acc.add(wname, _cat(parts))
        return
    ghost = norm == "l2" and T * (pg + dg) < pg * dg
    if ghost:
        ctx.path(name, "conv-ghost")
        per = G * (T * pg + 2 * T * T)
        parts = []
        for sl in _chunks(b, per, esz, ctx.budget, ctx.tile):
            A, Gm = unfolded(sl)
            parts.append(_gram_sq(A, Gm))
        ctx.acc.add(wname, _cat(parts))
        return
    ctx.path(name, "conv-mat")
    dblk = _dblock(G, dg, pg, esz, ctx.tile)
    per = G * (T * pg + dblk * pg)
    parts = []
    for sl in _chunks(b, per, esz, ctx.budget, ctx.tile):
        A, Gm = unfolded(sl)
        At = A.transpose(-1, -2)
        st = None
        for d0 in range(0, dg, dblk):
            ps = torch.matmul(Gm[:, :, d0 : d0 + dblk], At)  # [b, G, dblk, pg] per-sample grads
            st = _combine(st, _stat(ps, norm), norm)
            del ps
        parts.append(st)
    ctx.acc.add(wname, _cat(parts))


def _do_norm(ctx: _Ctx, name: str, m: nn.Module, kind: str, calls, want: Dict[str, str]) -> None:
    norm = ctx.norm
    ctx.path(name, "norm")
    wsum = None
    bsum = None
    for x, g in calls:
        b = x.shape[0]
        if kind == "bn":
            c = x.shape[1]
            xs, gs = x.reshape(b, c, -1), g.reshape(b, c, -1)
            sg = gs.sum(-1)
            if "weight" in want:
                sgx = torch.linalg.vecdot(gs, xs, dim=-1)
                w = (sgx - m.running_mean.to(sg.dtype) * sg) * torch.rsqrt(m.running_var.to(sg.dtype) + m.eps)
                wsum = w if wsum is None else wsum + w
            bsum = sg if bsum is None else bsum + sg
            continue
        if kind == "ln":
            n = int(np.prod(m.normalized_shape))
            xs, gs = x.reshape(b, -1, n), g.reshape(b, -1, n)
            var, mean = torch.var_mean(xs, dim=-1, keepdim=True, correction=0)
            sum_dim = 1
        elif kind == "ln2d":
            c = x.shape[1]
            xs, gs = x.reshape(b, c, -1), g.reshape(b, c, -1)
            var, mean = torch.var_mean(xs, dim=1, keepdim=True, correction=0)
            sum_dim = -1
        else:  # gn
            c = x.shape[1]
            ng = m.num_groups
            xg = x.reshape(b, ng, -1)
            var, mean = torch.var_mean(xg, dim=-1, keepdim=True, correction=0)
            xs = ((xg - mean) * torch.rsqrt(var + m.eps)).reshape(b, c, -1)
            gs = g.reshape(b, c, -1)
            sum_dim = -1
            mean = None
        if "weight" in want:
            xhat = xs if mean is None else (xs - mean) * torch.rsqrt(var + m.eps)
            w = (gs * xhat).sum(sum_dim)
            wsum = w if wsum is None else wsum + w
        sg = gs.sum(sum_dim)
        bsum = sg if bsum is None else bsum + sg
    if "weight" in want:
        ctx.acc.add(want["weight"], _stat(wsum, norm))
    if "bias" in want:
        ctx.acc.add(want["bias"], _stat(bsum, norm))


def _is_batched(t: Any, b: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == b


def _do_local(ctx: _Ctx, name: str, m: nn.Module, calls, want: Dict[str, str], chunk: int) -> None:
    """torch.func fallback on one module: per-sample grad of ⟨m(args_i), g_i⟩ w.r.t. its direct params."""
    from torch.func import functional_call, grad, vmap

    ctx.path(name, "local-func")
    local = list(want.keys())  # direct param names (no dots)
    pvals = {k: getattr(m, k).detach() for k in local}
    totals: Dict[str, torch.Tensor] = {}
    for (args, kwargs, b), gouts in calls:
        flat_args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]  # no outer graph
        in_dims = tuple(0 if _is_batched(t, b) else None for t in flat_args)

        def f(pv, fargs, gs, _kwargs=kwargs, _dims=in_dims):
            a1 = [
                (t.unsqueeze(0).clone() if d == 0 else t) if isinstance(t, torch.Tensor) else t
                for t, d in zip(fargs, _dims)
            ]
            out = functional_call(m, pv, tuple(a1), _kwargs)
            outs = _flat_tensors(out)
            tot = 0.0
            for o, gi in zip(outs, gs):
                if gi is not None and o is not None:
                    tot = tot + (o * gi.unsqueeze(0)).sum()
            return tot

        gs_dims = [0 if gi is not None else None for gi in gouts]
        per = vmap(grad(f), in_dims=(None, list(in_dims), gs_dims), chunk_size=chunk)(pvals, flat_args, list(gouts))
        for k in local:
            totals[k] = per[k] if k not in totals else totals[k] + per[k]
    for k, full in want.items():
        if k in totals:
            ctx.acc.add(full, _stat(totals[k], ctx.norm))


def _flat_tensors(out: Any) -> List[Optional[torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        res: List[Optional[torch.Tensor]] = []
        for o in out:
            res.extend(_flat_tensors(o))
        return res
    if out is None:
        return [None]
    raise TypeError(type(out).__name__)


class _LogitsWrapper(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model

    def forward(self, x):
        return forward_logits_features(self.m, x)[0]


def _do_global(ctx: _Ctx, model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: List[str], chunk: int) -> None:
    """torch.func fallback over the whole model, restricted to parameters ``names``."""
    from torch.func import functional_call, grad, vmap

    if not names:
        return
    for n in names:
        ctx.path(n, "global-func")
    wrapper = _LogitsWrapper(model)
    pd = dict(model.named_parameters())
    pvals = {"m." + n: pd[n].detach() for n in names}

    def f(pv, xi, yi):
        logits = functional_call(wrapper, pv, (xi.unsqueeze(0),))
        return F.cross_entropy(logits, yi.unsqueeze(0))

    per = vmap(grad(f), in_dims=(None, 0, 0), chunk_size=chunk)(pvals, x, y)
    for n in names:
        ctx.acc.add(n, _stat(per["m." + n], ctx.norm))


# --------------------------------------------------------------------------------------
# The hooked engine
# --------------------------------------------------------------------------------------
class _ModState:
    __slots__ = ("name", "module", "kind", "want", "calls", "pending", "bad", "clone", "done", "pend")

    def __init__(self, name, module, kind, want, clone):
        self.name = name
        self.module = module
        self.kind = kind
        self.want = want  # local param name -> full name
        self.calls: List[dict] = []
        self.pending = 0
        self.bad = False
        self.clone = clone
        self.done = False
        self.pend: Optional[torch.Tensor] = None


# Per-model memory of how root mode went (models whose first layer's output is modified in
# place need a copied root; models whose raw input no leaf module consumes skip root mode).
_ROOT_CLONE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_NO_ROOT: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


class _Engine:
    def __init__(
        self, model, wanted: Dict[str, nn.Parameter], ctx: _Ctx, clone_mods: set, func_chunk: int, root_mode: bool
    ):
        self.model = model
        self.ctx = ctx
        self.active = False
        self.func_chunk = func_chunk
        self.stale: set = set()
        self.states: Dict[str, _ModState] = {}
        self.handles = []
        self.root_mode = root_mode
        self.roots: List[torch.Tensor] = []
        self.root_clone = model in _ROOT_CLONE
        self.roots_seen = True
        self.xr: Optional[torch.Tensor] = None
        if root_mode:
            # Registered before the capture hooks so that those see the replaced output.
            for mod in model.modules():
                if next(mod.children(), None) is None:
                    self.handles.append(mod.register_forward_hook(self._root))
        wanted_ids = {id(p): n for n, p in wanted.items()}
        for mname, mod in model.named_modules():
            want = {}
            for pname, p in mod._parameters.items():
                if p is not None and id(p) in wanted_ids:
                    want[pname] = wanted_ids.pop(id(p))
            if not want:
                continue
            kind = _layer_kind(mod)
            if kind != "local" and set(want) - {"weight", "bias"}:
                kind = "local"
            act = kind.startswith("act-")
            st = _ModState(mname, mod, kind[4:] if act else kind, want, mname in clone_mods)
            self.states[mname] = st
            if act:
                self.handles.append(mod.register_forward_pre_hook(partial(self._act_in, st)))
                self.handles.append(mod.drop.register_forward_pre_hook(partial(self._act_mid, st)))
                self.handles.append(mod.register_forward_hook(partial(self._act_out, st)))
            else:
                self.handles.append(mod.register_forward_hook(partial(self._fwd, st), with_kwargs=True))
        # parameters listed by named_parameters but owned by no module (shouldn't happen)
        self.orphans = list(wanted_ids.values())

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _root(self, mod, args, out):
        """A leaf module applied to the raw input: cut the graph at its output (no input grad)."""
        if self.active and args and args[0] is self.xr and isinstance(out, torch.Tensor) and out.is_floating_point():
            r = out.detach().requires_grad_(True)
            self.roots.append(r)
            # A leaf that requires grad may not be modified in place (e.g. conv → ReLU(inplace));
            # models known to do that get a non-leaf copy.
            return r.clone() if self.root_clone else r
        return None

    # timm norm+act layers: input at entry, norm output at the entry of ``drop``
    def _act_in(self, st: _ModState, mod, args):
        if self.active and not st.bad:
            st.pend = args[0] if len(args) == 1 and isinstance(args[0], torch.Tensor) else None
            if st.pend is None:
                st.bad = True

    def _act_mid(self, st: _ModState, mod, args):
        if not self.active or st.bad or st.pend is None:
            return
        z = args[0]
        a, st.pend = st.pend, None
        if not (isinstance(z, torch.Tensor) and z.requires_grad):
            st.bad = True
            return
        self._capture(st, a, z)

    def _capture(self, st: _ModState, a: torch.Tensor, z: torch.Tensor) -> None:
        """Record layer input `a` (copied if the model edits it in place) and hook z's gradient."""
        if st.clone:
            a = a.clone()
        call = {"a": a, "ver": a._version, "g": None}
        st.calls.append(call)
        st.pending += 1
        z.register_hook(partial(self._grad, st, call))

    def _act_out(self, st: _ModState, mod, args, out):
        if self.active and st.pend is not None:  # drop was not reached: unknown forward
            st.bad = True
            st.pend = None

    def _fwd(self, st: _ModState, mod, args, kwargs, out):
        if not self.active or st.bad:
            return
        if st.kind == "local":
            b = self.batch
            outs = _flat_tensors_safe(out)
            batched_kw = any(_is_batched(v, b) for v in kwargs.values())
            if outs is None or batched_kw or not any(o is not None and o.requires_grad for o in outs):
                st.bad = True
                return
            cargs = tuple(a.clone() if (st.clone and isinstance(a, torch.Tensor)) else a for a in args)
            vers = [a._version if isinstance(a, torch.Tensor) else None for a in cargs]
            call = {"args": cargs, "kwargs": dict(kwargs), "vers": vers, "b": b, "g": [None] * len(outs), "n": 0}
            st.calls.append(call)
            for i, o in enumerate(outs):
                if o is not None and o.requires_grad:
                    o.register_hook(partial(self._grad_local, st, call, i))
            return
        if len(args) != 1 or kwargs or not isinstance(out, torch.Tensor) or not out.requires_grad:
            st.bad = True
            return
        self._capture(st, args[0], out)

    def _grad_local(self, st, call, i, g):
        call["g"][i] = g.detach()

    def _grad(self, st: _ModState, call, g):
        if st.bad:
            return
        call["g"] = g.detach()
        st.pending -= 1
        if st.pending == 0:
            self._process(st)

    def _process(self, st: _ModState):
        if st.done or st.bad:
            return
        st.done = True
        pairs = []
        for c in st.calls:
            if c["a"]._version != c["ver"]:
                self.stale.add(st.name)
                st.calls = []
                return
            if c["g"] is not None:
                pairs.append((c["a"], c["g"]))
        st.calls = []
        if not pairs:
            return  # output never reached the loss: zero gradient
        if st.kind == "linear":
            _do_linear(self.ctx, st.name, st.module, pairs, st.want)
        elif st.kind == "conv":
            _do_conv(self.ctx, st.name, st.module, pairs, st.want)
        else:
            _do_norm(self.ctx, st.name, st.module, st.kind, pairs, st.want)

    def run(self, x, y):
        """Forward + one backward; returns (loss, logits, h, global_names), or None when root
        mode did not catch the whole graph (retry with the input requiring grad).

        Root mode: the input does not require grad; the output of every leaf module applied
        directly to it becomes an autograd root, so the backward stops there (saves the
        first layer's input gradient, which a training step never computes either).
        """
        self.batch = x.shape[0]
        xr = x.detach()
        if not self.root_mode:
            xr.requires_grad_(True)
        self.xr = xr
        self.active = True
        try:
            with torch.enable_grad():
                logits, h = forward_logits_features(self.model, xr)
                loss = F.cross_entropy(logits, y, reduction="none")
        except RuntimeError as e:
            if self.root_mode and not self.root_clone and "leaf Variable" in str(e):
                _ROOT_CLONE.add(self.model)
                return None
            raise
        finally:
            self.active = False
            self.xr = None
        self.roots_seen = bool(self.roots)
        if self.root_mode and (not self.roots or any(st.bad for st in self.states.values())):
            return None
        if loss.requires_grad:
            torch.autograd.grad(loss.sum(), self.roots if self.root_mode else xr, allow_unused=True)
        self.roots = []
        global_names = list(self.orphans)
        with torch.no_grad():  # (torch.func.grad ignores an outer no_grad)
            for st in self.states.values():
                if st.bad or (not st.calls and not st.done):
                    # never called, or output independent of the input: whole-model fallback
                    global_names.extend(st.want.values())
                    st.calls = []
                    continue
                if st.kind == "local":
                    for c in st.calls:
                        for a, v in zip(c["args"], c["vers"]):
                            if isinstance(a, torch.Tensor) and a._version != v:
                                self.stale.add(st.name)
                    if st.name in self.stale:
                        st.calls = []
                        continue
                    calls = [
                        ((c["args"], c["kwargs"], c["b"]), c["g"])
                        for c in st.calls
                        if any(gi is not None for gi in c["g"])
                    ]
                    st.calls = []
                    if calls:
                        _do_local(self.ctx, st.name, st.module, calls, st.want, self.func_chunk)
                elif not st.done:
                    self._process(st)  # some calls' outputs got no gradient
        return loss.detach(), logits.detach(), h.detach(), global_names


def _flat_tensors_safe(out):
    try:
        return _flat_tensors(out)
    except TypeError:
        return None


def _check_eval(model: nn.Module) -> None:
    bad = [n or type(model).__name__ for n, m in model.named_modules() if m.training]
    if bad:
        raise CleanError(
            f"model must be in eval mode for per-sample scores (module {bad[0]!r} is in training mode); "
            "call model.eval() first"
        )
    for n, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None:
            raise CleanError(
                f"BatchNorm {n!r} has no running statistics (track_running_stats=False), so a sample's "
                "score would depend on its batch-mates"
            )


def per_sample_grad_norms(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str = "l2",
    params: str = "all",
    *,
    mem_budget_mb: float = 32.0,
    func_chunk: int = 16,
    details: bool = False,
) -> Dict[str, Any]:
    """Per-sample loss and ‖∇_θ' L_i‖ for every sample of a batch, without a per-sample loop.

    Args:
        model: timm-style classifier in eval mode.
        x: inputs [B, ...]; y: integer labels [B].
        norm: "l1", "l2" or "linf" of the flattened gradient of L_i.
        params: "last", "weights", "biases" or "all" (see module docstring).
        mem_budget_mb: cap on the temporaries (unfolded inputs, per-sample gradients,
            Grams) of one layer chunk. Chunks are normally sized to a 2 MiB cache tile,
            so this only binds when set lower; a single sample's unfolded input is the
            smallest unit.
        func_chunk: vmap chunk size for the torch.func fallbacks.
        details: also return "per_param" ({param name: [B] norm}) and "paths"
            ({module or param name: path taken}).

    Returns:
        {"loss": [B], "logits": [B, C], "h": [B, D], "grad_norm": [B]} (+ details).
    """
    _check_norm(norm)
    wanted = param_subset(model, params)
    _check_eval(model)
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise CleanError(f"labels must have shape [{x.shape[0]}], got {list(y.shape)}")
    y = y.to(device=x.device, dtype=torch.long)
    head = _head(model)

    if params == "last" and _layer_kind(head) == "linear":
        with torch.no_grad():
            logits, h = forward_logits_features(model, x)
            loss = F.cross_entropy(logits, y, reduction="none")
        if h.dim() == 2:
            w = head.weight.requires_grad
            b = head.bias is not None and head.bias.requires_grad
            gn = last_layer_norms(logits, h, y, norm, weight=w, bias=b) if (w or b) else torch.zeros_like(loss)
            out = {"loss": loss, "logits": logits, "h": h, "grad_norm": gn}
            if details:
                out["paths"] = {"": "last-closed-form"}
                out["per_param"] = {}
            return out

    dtype = x.dtype if x.is_floating_point() else torch.float32
    paths: Optional[Dict[str, str]] = {} if details else None
    if not wanted:  # e.g. "biases" of a model without biases: all gradients are empty
        with torch.no_grad():
            logits, h = forward_logits_features(model, x)
            loss = F.cross_entropy(logits, y, reduction="none")
        out = {"loss": loss, "logits": logits, "h": h, "grad_norm": torch.zeros_like(loss, dtype=dtype)}
        if details:
            out["per_param"], out["paths"] = {}, {}
        return out
    budget = int(mem_budget_mb * 2**20)
    all_params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in all_params]
    clone_mods: set = set()
    try:
        for p in all_params:
            p.requires_grad_(False)
        root_mode = model not in _NO_ROOT
        for attempt in range(5):
            acc = _Acc(norm, x.shape[0], dtype, x.device, details)
            ctx = _Ctx(norm, acc, budget, paths)
            eng = _Engine(model, wanted, ctx, clone_mods, func_chunk, root_mode)
            try:
                res = eng.run(x, y)
            finally:
                eng.remove()
            if res is None:  # retry: root mode with copies, or the input requiring grad
                if root_mode and not eng.roots_seen:
                    _NO_ROOT.add(model)  # no leaf module sees the raw input: skip root mode next time
                root_mode = root_mode and eng.root_clone is False and model in _ROOT_CLONE
                continue
            loss, logits, h, global_names = res
            if not eng.stale:
                break
            clone_mods = clone_mods | eng.stale
        else:  # pragma: no cover - inputs still mutated after cloning
            raise CleanError(f"layers {sorted(eng.stale)} see inputs modified in place; cannot score")
        _do_global(ctx, model, x, y, global_names, func_chunk)
    finally:
        for p, f in zip(all_params, flags):
            p.requires_grad_(f)
    out = {"loss": loss, "logits": logits, "h": h, "grad_norm": acc.finish()}
    if details:
        out["per_param"] = acc.finish_per_param()
        out["paths"] = paths
    return out
