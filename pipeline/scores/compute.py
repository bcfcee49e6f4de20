"""Forward-pass and checkpoint score families: loss, grad_norm, el2n, margin; self_influence.

Batched tensor math over uint8 images (formulas: docs/methods.md §1). The per-sample gradient
norms come from pipeline/scores/engine.py (closed form for the head, ghost norms per layer).
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import numpy as np

from pipeline.registry import SCORES

# The computing imports sit in the functions: this module registers SCORES entries, and every
# stage that reads a score column's name or suspicious end imports it (dvc deps stay narrow).


def forward_scores(model, images_u8, labels: np.ndarray, mean, std, norm: str = "l2",
                   subset: str = "last", batch_size: int = 256, device: str = "cpu",
                   progress=None, features: bool = False) -> dict[str, np.ndarray]:
    """Eval-mode per-sample scores of uint8 images [N,C,H,W] with int labels [N]; the gradient
    norm `norm` over the parameter subset `subset` (score.params: last | weights | biases | all).

    `images_u8` is an array or streamed images (pipeline/stream.py: decoded batch by batch
    by worker processes; never the whole set). Returns {pred [N] int, loss [N] nats,
    grad_norm [N], el2n [N], margin [N]} as numpy. Independent of batch_size (BatchNorm uses
    running stats). Always float32 (no autocast): the per-sample norm math needs it.
    With `features`, also the same pass's image features (pipeline/scores/features.py:
    emb float16 [N, D], hash, image statistics), so `clean score` decodes and forwards the
    scored images once.
    """
    from pipeline.data.stream import iter_batches
    from pipeline.training.infer import batches

    model.eval()
    out = {k: np.empty(len(labels), np.float64) for k in ("loss", "grad_norm", "el2n", "margin")}
    out["pred"] = np.empty(len(labels), np.int64)
    spans = list(batches(len(labels), batch_size))
    feed = iter_batches(images_u8, [slice(s, e) for s, e in spans], pin=str(device).startswith("cuda"))
    with _exact_fp32():
        _score_batches(model, spans, feed, labels, mean, std, norm, subset, device, out, progress, features)
    return out


@contextlib.contextmanager
def _exact_fp32():
    """No TF32 inside: on GPUs convolutions/matmuls otherwise round inputs to 10-bit mantissas."""
    import torch

    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _score_batches(model, spans, feed, labels, mean, std, norm, subset, device, out, progress,
                   features: bool = False) -> None:
    import torch

    from pipeline.scores.engine import per_sample_grad_norms
    from pipeline.scores.features import batch_features, empty_features
    from pipeline.training.infer import normalize

    for (s, e), xb in zip(spans, feed):
        x = normalize(xb, mean, std, device)
        y = torch.as_tensor(np.array(labels[s:e], np.int64), device=device)
        r = per_sample_grad_norms(model, x, y, norm=norm, params=subset)
        logits = r["logits"].detach().double()  # float64 from here: small losses keep their digits
        p = torch.softmax(logits, 1)
        onehot = torch.nn.functional.one_hot(y, logits.shape[1]).double()
        z_y = logits.gather(1, y[:, None])[:, 0]
        other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
        out["loss"][s:e] = torch.nn.functional.cross_entropy(logits, y, reduction="none").cpu().numpy()
        out["grad_norm"][s:e] = r["grad_norm"].detach().double().cpu().numpy()
        out["el2n"][s:e] = torch.linalg.vector_norm(p - onehot, dim=1).double().cpu().numpy()
        out["margin"][s:e] = (z_y - other).double().cpu().numpy()
        out["pred"][s:e] = logits.argmax(1).cpu().numpy()
        if features:
            f = batch_features(xb, r["h"])
            if "emb" not in out:
                out.update(empty_features(len(labels), f["emb"].shape[1]))
            for k, v in f.items():
                out[k][s:e] = v
        if progress:
            progress("advance", n=e - s)


def self_influence(model, checkpoints: list[tuple[Path, float]], images_u8, labels, mean, std,
                   subset: str = "last", batch_size: int = 256, device: str = "cpu",
                   progress=None) -> np.ndarray:
    """TracIn self-influence Σ_c lr_c · ‖∇_θ' L_i(θ_c)‖₂² over checkpoints [(file, lr_c)] → [N].

    `model` is loaded with each checkpoint's weights in turn (its own weights are restored).
    """
    from pipeline.models import load_weights

    total = np.zeros(len(labels), np.float64)
    work = copy.deepcopy(model)
    for path, lr in checkpoints:
        load_weights(work, path)
        work.to(device).eval()
        g = forward_scores(work, images_u8, labels, mean, std, "l2", subset, batch_size, device, progress)
        total += lr * g["grad_norm"] ** 2
    return total


@SCORES.register_family({
    "loss": dict(needs=("forward",), doc="cross-entropy of the given label (nats)"),
    "grad_norm": dict(needs=("forward", "backward"),
                      doc="‖∇_θ' L_i‖ for score.norm over score.params (closed form for `last`, ghost norms otherwise)"),
    "el2n": dict(needs=("forward",), doc="‖softmax − onehot‖₂"),
    "margin": dict(needs=("forward",), suspicious="low", doc="z_y − max_{k≠y} z_k of the final model"),
})
def forward_family(inputs, config) -> dict[str, np.ndarray]:
    """One eval-mode pass: loss, grad_norm, el2n, margin [N] (+ pred [N], and the image
    features of pipeline/scores/features.py when config.embeddings)."""
    return forward_scores(inputs.model, inputs.images, inputs.labels, inputs.mean, inputs.std, config.norm,
                          config.subset, config.batch_size, inputs.device, inputs.progress, features=config.embeddings)
