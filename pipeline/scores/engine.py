"""The hook engine and ``per_sample_grad_norms`` (method: docs/methods.md §1).

One forward pass with hooks, then ONE backward of Σ_i L_i that only produces activation
gradients: parameters are temporarily set to ``requires_grad=False``, and the output of the
first leaf module applied to the raw input becomes the autograd root ("root mode"), so no
gradient w.r.t. the input is computed. (If no leaf module consumes the raw input, or a root
is modified in place, the pass is redone with a copied root or with the input requiring
grad.) A forward hook keeps each layer's input, a tensor hook on its output receives the
output gradient, and the layer's norms (``pipeline.scores.layers``) are computed right there
during the backward, after which both are released. A captured input later modified in
place makes the affected layers be recomputed in a second pass that clones their inputs.
timm norm+act layers have their norm's output gradient caught at the entry of ``drop``.
"""
from __future__ import annotations

import weakref
from functools import partial
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.errors import CleanError
from pipeline.head import _check_norm, _head, forward_logits_features, last_layer_norms
from pipeline.scores.layers import (
    _Acc,
    _Ctx,
    _do_conv,
    _do_global,
    _do_linear,
    _do_local,
    _do_norm,
    _flat_tensors,
    _is_batched,
    _layer_kind,
    param_subset,
)

__all__ = ["per_sample_grad_norms"]


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
        params: "last", "weights", "biases" or "all" (docs/methods.md §1.2).
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
        out = _closed_form_last(model, head, x, y, norm, details)
        if out is not None:
            return out
    dtype = x.dtype if x.is_floating_point() else torch.float32
    if not wanted:  # e.g. "biases" of a model without biases: all gradients are empty
        with torch.no_grad():
            logits, h = forward_logits_features(model, x)
            loss = F.cross_entropy(logits, y, reduction="none")
        out = {"loss": loss, "logits": logits, "h": h, "grad_norm": torch.zeros_like(loss, dtype=dtype)}
        if details:
            out["per_param"], out["paths"] = {}, {}
        return out
    paths: Optional[Dict[str, str]] = {} if details else None
    all_params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in all_params]
    try:
        for p in all_params:
            p.requires_grad_(False)
        loss, logits, h, acc = _hooked_pass(model, wanted, x, y, norm, dtype, int(mem_budget_mb * 2**20), paths,
                                            func_chunk, details)
    finally:
        for p, f in zip(all_params, flags):
            p.requires_grad_(f)
    out = {"loss": loss, "logits": logits, "h": h, "grad_norm": acc.finish()}
    if details:
        out["per_param"] = acc.finish_per_param()
        out["paths"] = paths
    return out


def _closed_form_last(model: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str,
                      details: bool) -> Optional[Dict[str, Any]]:
    """params = "last" with a linear head on flat features: one no-grad forward and the closed
    form (pipeline/head.py) → the result of :func:`per_sample_grad_norms`; None when the head's
    input is not flat (the hooked pass handles it)."""
    with torch.no_grad():
        logits, h = forward_logits_features(model, x)
        loss = F.cross_entropy(logits, y, reduction="none")
    if h.dim() != 2:
        return None
    w = head.weight.requires_grad
    b = head.bias is not None and head.bias.requires_grad
    gn = last_layer_norms(logits, h, y, norm, weight=w, bias=b) if (w or b) else torch.zeros_like(loss)
    out = {"loss": loss, "logits": logits, "h": h, "grad_norm": gn}
    if details:
        out["paths"] = {"": "last-closed-form"}
        out["per_param"] = {}
    return out


def _hooked_pass(model: nn.Module, wanted, x: torch.Tensor, y: torch.Tensor, norm: str, dtype, budget: int,
                 paths, func_chunk: int, details: bool):
    """The hooked forward + one backward (the parameters' requires_grad already off) →
    (loss [B], logits [B, C], h [B, D], the norm accumulator). Retries in root mode with
    copies, or with cloned inputs for layers that see inputs modified in place."""
    clone_mods: set = set()
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
    return loss, logits, h, acc
