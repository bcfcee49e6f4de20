"""Per-layer per-sample gradient norms (formulas: docs/methods.md §1).

Each ``_do_*`` function receives all calls of one module in a batch (captured inputs a_k
and output gradients g_k) and adds that module's per-sample norm statistics to an ``_Acc``:

* ``_do_linear``  nn.Linear: rank one on [B, in]; on [B, T, in] the ghost Gram identity
  (l2, when T·(in+out) < in·out) or the per-sample gradient built in cache-sized blocks.
* ``_do_conv``    nn.Conv1d / nn.Conv2d: the input unfolded per group (an as_strided view +
  copy; F.unfold's CPU im2col is 20-100× slower), then rank one / ghost / blocks as Linear.
* ``_do_norm``    BatchNorm (running statistics), LayerNorm, LayerNorm2d, GroupNorm and
  timm's fused norm+activation layers: Σ_positions g·x̂ and Σ_positions g.
* ``_do_local`` / ``_do_global``  ``torch.func.vmap(grad(...))`` fallbacks on one module /
  on the whole model restricted to some parameters.

Also the layer-kind detection (exact types only: subclasses that override ``forward`` are
not trusted, apart from the listed timm types) and ``param_subset``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.errors import CleanError
from pipeline.head import SUBSETS, _head, forward_logits_features

__all__ = ["param_subset"]

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
# Parameter subsets
# --------------------------------------------------------------------------------------
def param_subset(model: nn.Module, params: str) -> Dict[str, nn.Parameter]:
    """Named trainable parameters in subset ``params`` (docs/methods.md §1.2)."""
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
