"""Train → validation influence (TracIn): ``val_influence`` (formulas: docs/methods.md §1).

val_influence_i = Σ_c η_c ⟨∇_θ' L_i(θ_c), ∇_θ' L̄_val(θ_c)⟩ over the saved checkpoints c
(η_c = that checkpoint's learning rate), L̄_val = the mean loss over the validation split.
Positive: a gradient step on sample i lowers the validation loss (helpful); negative: it
raises it (harmful). Per checkpoint the validation gradient v is one fixed vector, so each
sample's value is one dot product ⟨∇L_i, v⟩, computed for a whole batch at once and never
from per-sample gradients:

* ``last`` (a linear head on flat features): the head identity ⟨r_i h_iᵀ ⊕ r_i, G_W ⊕ g_b⟩ =
  r_iᵀ G_W h_i + r_i·g_b with r = softmax(z) − e_y and (G_W, g_b) the mean validation head
  gradient, itself Σ_j r_j h_jᵀ / M, Σ_j r_j / M: forward passes only.
* ``weights`` / ``biases`` / ``all``: v by one ordinary backward of L̄_val, then the
  directional derivative of the per-sample loss vector along v — one forward-mode pass
  (``torch.func.jvp``) gives all B products of a batch. Measured against per-layer ghost dot
  products Σ_t g_tᵀ V a_t (bench/score_speed.py): both ≤ 2× a training step; jvp needs no
  per-layer code and covers every module type.

Eval mode (BatchNorm on running statistics), float32 (no TF32), as every other score.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.data.stream import iter_batches
from pipeline.head import _head, forward_logits_features, last_layer_residual
from pipeline.models import load_weights
from pipeline.scores.compute import _exact_fp32
from pipeline.scores.engine import _check_eval
from pipeline.scores.layers import _LogitsWrapper, _layer_kind, param_subset
from pipeline.training.infer import batches, normalize

__all__ = ["val_gradient", "grad_dots", "val_influence"]


def _closed_form_head(model: nn.Module, params: str) -> bool:
    return params == "last" and _layer_kind(_head(model)) == "linear"


def val_gradient(model: nn.Module, batches, params: str = "all") -> Dict[str, torch.Tensor]:
    """∇_θ' L̄_val: the gradient of the mean loss over all (x, y) of ``batches`` → {param name: tensor}.

    `batches` yields normalised inputs and labels on the model's device. Model in eval mode.
    ``last`` with a linear head uses the closed form (forward passes only); otherwise one
    backward per batch of the summed loss, restricted to the subset's parameters.
    """

    _check_eval(model)
    wanted = param_subset(model, params)
    if not wanted:
        return {}
    closed = _closed_form_head(model, params)
    total: Dict[str, torch.Tensor] = {}
    m = 0
    head = _head(model)
    names = {id(p): n for n, p in wanted.items()}
    for x, y in batches:
        m += int(y.shape[0])
        parts = None
        if closed:
            with torch.no_grad():
                logits, h = forward_logits_features(model, x)
            if h.dim() == 2:  # the head identity: ∇_W = Σ r hᵀ, ∇_b = Σ r
                r = last_layer_residual(logits.detach(), y)
                parts = {}
                if id(head.weight) in names:
                    parts[names[id(head.weight)]] = r.T @ h
                if head.bias is not None and id(head.bias) in names:
                    parts[names[id(head.bias)]] = r.sum(0)
        if parts is None:
            with torch.enable_grad():
                logits, _ = forward_logits_features(model, x)
                loss = F.cross_entropy(logits, y, reduction="sum")
                gs = torch.autograd.grad(loss, list(wanted.values()), allow_unused=True)
            parts = {n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(wanted.items(), gs)}
        for n, g in parts.items():
            total[n] = g.detach() if n not in total else total[n] + g.detach()
    if m == 0:
        return {n: torch.zeros_like(p) for n, p in wanted.items()}
    return {n: g / m for n, g in total.items()}


def grad_dots(model: nn.Module, x: torch.Tensor, y: torch.Tensor, v: Dict[str, torch.Tensor],
              params: str = "all") -> torch.Tensor:
    """Per-sample ⟨∇_θ' L_i, v⟩ for a batch → [B], without per-sample gradients.

    `v` is {param name: tensor} over the subset ``params`` (as returned by :func:`val_gradient`).
    ``last`` with a linear head: r_iᵀ V_W h_i + r_i·v_b (one forward pass); otherwise the
    forward-mode derivative of the per-sample loss vector along v (``torch.func.jvp``).
    """
    from torch.func import functional_call, jvp

    y = y.to(device=x.device, dtype=torch.long)
    if not v:
        return torch.zeros(x.shape[0], dtype=x.dtype if x.is_floating_point() else torch.float32, device=x.device)
    if _closed_form_head(model, params):
        head = _head(model)
        names = {id(p): n for n, p in model.named_parameters()}
        with torch.no_grad():
            logits, h = forward_logits_features(model, x)
            if h.dim() == 2:
                r = last_layer_residual(logits, y)
                out = torch.zeros(x.shape[0], dtype=r.dtype, device=x.device)
                vw = v.get(names[id(head.weight)])
                if vw is not None:
                    out += ((r @ vw) * h).sum(1)
                vb = v.get(names[id(head.bias)]) if head.bias is not None else None
                if vb is not None:
                    out += r @ vb
                return out
    wrapper = _LogitsWrapper(model)
    primals = {"m." + n: p.detach() for n, p in model.named_parameters() if n in v}
    tangents = {k: v[k[2:]].to(dtype=p.dtype) for k, p in primals.items()}

    def losses(pv):
        logits = functional_call(wrapper, pv, (x,), strict=False)
        return F.cross_entropy(logits, y, reduction="none")

    with torch.no_grad():  # forward mode only: no reverse graph is kept
        _, dots = jvp(losses, (primals,), (tangents,))
    return dots.detach()


def val_influence(model: nn.Module, checkpoints: list[tuple[Path, float]], images_u8, labels: np.ndarray,
                  val_images_u8, val_labels: np.ndarray, mean, std, params: str = "all",
                  batch_size: int = 256, device: str = "cpu", progress=None) -> np.ndarray:
    """Σ_c lr_c ⟨∇_θ' L_i(θ_c), ∇_θ' L̄_val(θ_c)⟩ over checkpoints [(file, lr_c)] → float64 [N].

    `images_u8` / `val_images_u8`: uint8 [N, C, H, W] arrays or streamed images (the training
    samples scored and the validation split); `model` is loaded with each checkpoint's weights
    in turn (its own weights are not touched). Independent of batch_size (eval mode).
    """

    pin = str(device).startswith("cuda")

    work = copy.deepcopy(model)
    dtype = next(work.parameters()).dtype  # float32 (a float64 model, as in the tests, computes in float64)

    def feed(imgs, labs):
        spans = list(batches(len(labs), batch_size))
        for (s, e), xb in zip(spans, iter_batches(imgs, [slice(s, e) for s, e in spans], pin=pin)):
            x = normalize(xb, mean, std, device).to(dtype)
            yield (s, e), x, torch.as_tensor(np.array(labs[s:e], np.int64), device=device)

    total = np.zeros(len(labels), np.float64)
    with _exact_fp32():
        for path, lr in checkpoints:
            load_weights(work, path)
            work.to(device).eval()
            v = val_gradient(work, ((x, y) for _, x, y in feed(val_images_u8, val_labels)), params)
            for (s, e), x, y in feed(images_u8, labels):
                total[s:e] += lr * grad_dots(work, x, y, v, params).double().cpu().numpy()
                if progress:
                    progress("advance", n=e - s)
    return total
