"""Training-data attribution: how much each training image moves each validation output
(formulas: docs/methods.md §1.6; measured by bench/lds.py).

τ(z)_i > 0: training image i lowers the loss of validation image z (helpful). Three estimators,
each a function of per-sample gradients of the *margin* f = log p_y − log(1 − p_y) (TRAK's
output function; ∇L = −(1 − p)·∇f):

* ``trak``: TRAK (Park et al. 2023) with a count sketch (sparse JL: each parameter lands in one of
  k buckets with a random sign, O(P) per sample, no dense k × P matrix) of the per-sample
  gradients, τ(z) = φ_z (ΦᵀΦ + λI)⁻¹ Φᵀ diag(1 − p), averaged over the trained seeds' models;
* ``trak_last``: the same estimator on the exact classifier-head gradients (∂f/∂z) ⊗ [h, 1]
  (forward passes only, no projection);
* ``tracin``: Σ_c lr_c ⟨∇L_i, ∇L_z⟩ over checkpoints (val_influence per validation image).

Per-sample gradients come from ``torch.func.vmap(grad(·))`` over a batch (no Python loop over
samples). Model in eval mode, float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

__all__ = ["Sketch", "margins", "margin_grads", "sketched_grads", "head_grads", "Features", "features",
           "trak_scores", "trak_mean_effect", "gauss_newton_scale",
           "removal_effects", "val_probs"]


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """f = log p_y − log(1 − p_y) = z_y − logsumexp_{k≠y} z_k → [B] (TRAK's model output)."""
    zy = logits.gather(1, y[:, None])[:, 0]
    other = logits.scatter(1, y[:, None], float("-inf"))
    return zy - torch.logsumexp(other, 1)


@dataclass
class Sketch:
    """A count sketch ℝ^P → ℝ^k: coordinate j goes to bucket idx[j] with sign sign[j]."""

    idx: torch.Tensor   # int64 [P]
    sign: torch.Tensor  # float32 [P], ±1
    k: int

    @classmethod
    def make(cls, p: int, k: int, seed: int = 0) -> "Sketch":
        g = torch.Generator().manual_seed(int(seed))
        idx = torch.randint(0, k, (p,), generator=g)
        sign = torch.randint(0, 2, (p,), generator=g).float() * 2 - 1
        return cls(idx, sign, k)

    def __call__(self, grads: torch.Tensor) -> torch.Tensor:
        """[B, P] → [B, k] (E‖Sx‖² = ‖x‖²)."""
        out = torch.zeros(grads.shape[0], self.k, dtype=grads.dtype, device=grads.device)
        return out.index_add_(1, self.idx.to(grads.device), grads * self.sign.to(grads.device))


def margin_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names=None) -> torch.Tensor:
    """Per-sample ∇_θ f_i for a batch, flattened over the parameters `names` (default: all
    trainable, in named_parameters order) → ([B, P], f [B]). One vmap(grad) call, no loop."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad and (names is None or n in names)}
    fixed = {n: b for n, b in model.named_buffers()}

    def f(pv, xi, yi):
        out = functional_call(model, {**pv, **fixed}, (xi[None],), strict=False)
        return margins(out, yi[None])[0]

    g = vmap(grad(f), in_dims=(None, 0, 0))(params, x, y)
    with torch.no_grad():
        fz = margins(model(x), y)
    return torch.cat([g[n].reshape(x.shape[0], -1) for n in params], 1), fz


def head_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ∇_{W,b} f_i of a linear head, (∂f/∂z) ⊗ [h, 1] → ([B, C·(D+1)], f [B]): forward only.
    ∂f/∂z_k = δ_ky − [k≠y]·p_k/(1 − p_y)."""
    from pipeline.head import forward_logits_features

    with torch.no_grad():
        logits, h = forward_logits_features(model, x)
        p = torch.softmax(logits.double(), 1)
        py = p.gather(1, y[:, None])
        d = -p / (1 - py).clamp_min(1e-12)
        d.scatter_(1, y[:, None], 1.0)
        h1 = torch.cat([h.double(), torch.ones(len(h), 1, dtype=torch.double, device=h.device)], 1)
        return (d[:, :, None] * h1[:, None, :]).reshape(len(x), -1).float(), margins(logits, y)


@dataclass
class Features:
    """One model's attribution features of a set: φ [N, k] and p(label) [N]."""

    phi: torch.Tensor
    p: torch.Tensor


def features(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str = "trak", k: int = 2048,
             seed: int = 0, batch_size: int = 256) -> Features:
    """φ of normalised images `x` [N, C, H, W] with labels `y` [N] under `model` (eval mode):
    ``trak`` = count-sketched per-sample margin gradients over all parameters (k columns);
    ``trak_last`` = the exact head gradients. Batched; float32."""
    model.eval()
    sk = None
    if kind == "trak":
        sk = Sketch.make(sum(p.numel() for p in model.parameters() if p.requires_grad), k, seed)
    phis, ps = [], []
    for s in range(0, len(y), batch_size):
        xb, yb = x[s:s + batch_size], y[s:s + batch_size]
        if sk is None:
            g, f = head_grads(model, xb, yb)
        else:
            g, f = margin_grads(model, xb, yb)
            g = sk(g)
        phis.append(g)
        ps.append(torch.sigmoid(f.double()))
    return Features(torch.cat(phis), torch.cat(ps))


#: rows of Φ widened to float64 at a time (16k × k 1024 = 128 MiB): a float64 copy of the whole Φ is 2× its
#: float32 size (7.4 GB at 900k training images); three of them ran `clean score` at 1M rows out of 24 GiB
ROW_CHUNK = 16384


def _rows(phi: torch.Tensor):
    """Φ [N, k] in float64 row blocks of ROW_CHUNK → (slice, block [n, k]) pairs, in order."""
    for s in range(0, phi.shape[0], ROW_CHUNK):
        yield slice(s, s + ROW_CHUNK), phi[s:s + ROW_CHUNK].double()


def _gram(phi: torch.Tensor) -> torch.Tensor:
    """ΦᵀΦ [k, k] in float64, summed over row blocks (never a float64 copy of Φ)."""
    a = torch.zeros(phi.shape[1], phi.shape[1], dtype=torch.float64)
    for _, b in _rows(phi):
        a += b.T @ b
    return a


def _inverse(phi: torch.Tensor, ridge: float) -> torch.Tensor:
    """(ΦᵀΦ + λI)⁻¹ in float64, λ = ridge · trace(ΦᵀΦ)/k."""
    a = _gram(phi)
    lam = ridge * float(torch.diagonal(a).mean())
    return torch.linalg.inv(a + lam * torch.eye(a.shape[0], dtype=a.dtype))


def trak_scores(train: list[Features], target: list[Features], ridge: float = 0.1) -> np.ndarray:
    """τ [V, N]: TRAK averaged over the models (one `Features` pair per model):
    φ_z (ΦᵀΦ + λI)⁻¹ Φᵀ diag(1 − p), in units of the margin f_z (> 0: i raises f_z, lowers L_z)."""
    out = None
    for tr, tg in zip(train, target):
        t = (tg.phi.double() @ _inverse(tr.phi, ridge)) @ (tr.phi.double() * (1 - tr.p)[:, None]).T
        out = t if out is None else out + t
    return (out / len(train)).numpy()


def trak_mean_effect(train: list[Features], target: list[Features], ridge: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Per training image, the predicted effect of its removal on the mean target loss, in nats
    (before the Gauss–Newton scale, gauss_newton_scale): e_i = mean_z (1 − p_z) τ(z)_i (dL/df = −(1 − p)),
    → (mean over models
    [N], per model [M, N]). Never forms the [V, N] matrix: u = (ΦᵀΦ + λI)⁻¹ Φ_zᵀ (1 − p_z)/V."""
    per = []
    for tr, tg in zip(train, target):
        u = _inverse(tr.phi, ridge) @ (tg.phi.double().T @ (1 - tg.p)) / len(tg.p)
        e = torch.empty(tr.phi.shape[0], dtype=torch.float64)
        for sl, b in _rows(tr.phi):
            e[sl] = b @ u
        per.append((e * (1 - tr.p)).numpy())
    per = np.stack(per)
    return per.mean(0), per


def gauss_newton_scale(train: Features) -> float:
    """r̄ = Σ_i p_i(1 − p_i)‖φ_i‖² / Σ_i ‖φ_i‖² of one model's training features: the scalar that
    makes r̄·ΦᵀΦ (TRAK's kernel) match the Gauss–Newton Hessian ΦᵀRΦ, R = diag(p(1 − p)) = d²L/df²,
    in trace. TRAK drops R, which ranks as well but shrinks every effect by ≈ r̄ (≈ 0.03 on a confident
    clean model, ≈ 0.1 with 10 % label noise): removal_effects divides by it (docs/methods.md §1.6)."""
    sq = torch.empty(train.phi.shape[0], dtype=torch.float64)
    for sl, b in _rows(train.phi):
        sq[sl] = (b ** 2).sum(1)
    r = train.p.double() * (1 - train.p.double())
    return float((r * sq).sum() / sq.sum().clamp_min(1e-300))


def _feed(images_u8, labels, mean, std, device, batch_size):
    """(normalised x, y) batches of uint8 images (an array or streamed), in order."""
    from pipeline.data.stream import iter_batches
    from pipeline.training.infer import batches, normalize

    spans = list(batches(len(labels), batch_size))
    for (s, e), xb in zip(spans, iter_batches(images_u8, [slice(s, e) for s, e in spans])):
        yield normalize(xb, mean, std, device), torch.as_tensor(np.array(labels[s:e], np.int64), device=device)


def _model_features(model: nn.Module, images_u8, labels, mean, std, k: int, seed: int, batch_size: int,
                    device: str, progress=None) -> Features:
    """Count-sketched per-sample margin gradients (all trainable parameters) of a uint8 set under
    `model`, in chunks small enough that a chunk's gradients stay under ~128 MiB."""
    model.eval()
    p = sum(q.numel() for q in model.parameters() if q.requires_grad)
    sk = Sketch.make(p, k, seed)
    chunk = max(1, min(batch_size, (1 << 25) // max(p, 1)))
    # filled in place (a list of blocks joined at the end holds Φ twice at that moment), in the parameters' dtype
    # (that of the gradients and so of their sketch)
    phi = torch.empty(len(labels), k, dtype=next(q for q in model.parameters() if q.requires_grad).dtype)
    ps = torch.empty(len(labels), dtype=torch.float64)
    s = 0
    for x, y in _feed(images_u8, labels, mean, std, device, chunk):
        g, f = margin_grads(model, x, y)
        phi[s:s + len(y)] = sk(g).cpu()
        ps[s:s + len(y)] = torch.sigmoid(f.double()).cpu()
        s += len(y)
        if progress:
            progress("advance", n=len(y))
    return Features(phi, ps)


def removal_effects(models: list, images_u8, labels, val_images_u8, val_labels, mean, std, k: int = 1024,
                    batch_size: int = 256, device: str = "cpu", progress=None, reference=None) -> dict:
    """Per model m and training image i, the predicted change of the mean validation loss (nats)
    when i is removed: TRAK with count-sketched gradients (module doc), divided by the model's
    gauss_newton_scale r̄_m (the calibration: no constant fitted to a data set).

    `models`: the trained seeds' models (eval mode). The target is the mean loss over the
    reference validation rows (`reference` bool [V]; None = every row — the score stage passes
    pipeline.rules.labels.reference_rows, the rows that are not label issues). Returns
    {effects [M, N] float64, val_loss [M, V] float64 (per model, every val row), reference [V] bool,
    calibration [M] = 1 / r̄_m}.
    """
    from pipeline.scores.compute import _exact_fp32

    val_labels = np.asarray(val_labels, np.int64)
    with _exact_fp32():
        vals = [_model_features(m, val_images_u8, val_labels, mean, std, k, j, batch_size, device)
                for j, m in enumerate(models)]
        ref = np.ones(len(val_labels), bool) if reference is None else np.asarray(reference, bool)
        val_loss = -np.log(np.clip(np.stack([v.p.numpy() for v in vals]), 1e-300, None))  # p = p(label)
        effects, cal = [], []
        for j, m in enumerate(models):
            tr = _model_features(m, images_u8, labels, mean, std, k, j, batch_size, device, progress)
            tg = Features(vals[j].phi[torch.as_tensor(ref)], vals[j].p[torch.as_tensor(ref)])
            cal.append(1.0 / max(gauss_newton_scale(tr), 1e-12))
            effects.append(cal[-1] * trak_mean_effect([tr], [tg])[0])
    return {"effects": np.stack(effects), "val_loss": val_loss, "reference": ref, "calibration": np.array(cal)}


def val_probs(model, images_u8, labels, mean, std, batch_size, device) -> np.ndarray:
    """softmax [V, C] of `model` (eval mode) on uint8 images."""
    out = []
    with torch.no_grad():
        for x, _ in _feed(images_u8, labels, mean, std, device, batch_size):
            out.append(torch.softmax(model(x).double(), 1).cpu().numpy())
    return np.concatenate(out)
