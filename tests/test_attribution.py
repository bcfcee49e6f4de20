"""Attribution (pipeline/scores/attribution.py): per-sample margin gradients against a per-sample
loop, the head closed form, the count sketch, the TRAK estimator's mean effect, and the
predicted change of the validation loss on a case with a known effect, measured by retraining."""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.models import create_model
from pipeline.scores.attribution import (CALIBRATION, Features, Sketch, head_grads, margin_grads, margins,
                                         removal_effects, trak_mean_effect, trak_scores)


def _model(seed=0, classes=4):
    torch.manual_seed(seed)
    return create_model("small_cnn", classes, 1, (8, 8)).double().eval()


def _banded(n: int, classes: int, seed: int):
    """uint8 [n·classes, 1, 8, 8]: class k has a faint bright band k (learnable, not trivially)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 100, size=(n * classes, 1, 8, 8)).astype(np.int64)
    y = np.repeat(np.arange(classes), n)
    for k in range(classes):
        band = slice(k * 8 // classes, (k + 1) * 8 // classes)
        x[y == k, 0, band, :] += rng.integers(60, 110, size=((y == k).sum(), band.stop - band.start, 8))
    return np.clip(x, 0, 255).astype(np.uint8), y


def test_margin_grads_match_a_per_sample_loop():
    m = _model()
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1])
    g, f = margin_grads(m, x, y)
    params = [p for p in m.parameters()]
    for i in range(5):
        fi = margins(m(x[i:i + 1]), y[i:i + 1])[0]
        ref = torch.cat([t.reshape(-1) for t in torch.autograd.grad(fi, params)])
        assert torch.allclose(g[i], ref, rtol=1e-9, atol=1e-12)
        assert torch.isclose(f[i], fi)
    p = torch.softmax(m(x), 1).gather(1, y[:, None])[:, 0]  # f = log p − log(1 − p)
    assert torch.allclose(f, torch.log(p) - torch.log1p(-p))


def test_head_grads_are_the_head_part_of_the_full_gradient():
    m = _model(1)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([3, 0, 1, 2])
    full, _ = margin_grads(m, x, y)
    head, _ = head_grads(m, x, y)
    w, b = m.head.weight, m.head.bias
    ref = torch.cat([full[:, -(w.numel() + b.numel()):-b.numel()].reshape(4, *w.shape),
                     full[:, -b.numel():][:, :, None]], 2)  # [B, C, D+1]: (∂f/∂z) ⊗ [h, 1]
    assert torch.allclose(head.double(), ref.reshape(4, -1), rtol=1e-5, atol=1e-6)


def test_count_sketch_sends_each_coordinate_to_one_bucket_with_its_sign():
    sk = Sketch.make(50, 7, seed=3)
    eye = torch.eye(50, dtype=torch.float64)
    out = sk(eye)
    assert out.shape == (50, 7)
    assert torch.equal(out.abs().sum(1), torch.ones(50, dtype=torch.float64))
    assert torch.equal(out[torch.arange(50), sk.idx], sk.sign.double())
    v = torch.randn(3, 50, dtype=torch.float64)
    assert torch.allclose(sk(v), v @ out)  # linear


def test_trak_mean_effect_is_the_loss_weighted_mean_of_trak_scores():
    rng = np.random.default_rng(0)
    tr = [Features(torch.as_tensor(rng.normal(size=(30, 6))), torch.as_tensor(rng.uniform(0.1, 0.9, 30)))
          for _ in range(2)]
    tg = [Features(torch.as_tensor(rng.normal(size=(9, 6))), torch.as_tensor(rng.uniform(0.1, 0.9, 9)))
          for _ in range(2)]
    tau = trak_scores(tr, tg)  # [V, N], averaged over the two models
    per = [trak_scores([a], [b]) for a, b in zip(tr, tg)]
    want = np.mean([((1 - b.p.numpy())[:, None] * t).mean(0) for b, t in zip(tg, per)], 0)
    mean, each = trak_mean_effect(tr, tg)
    assert each.shape == (2, 30)
    np.testing.assert_allclose(mean, want, rtol=1e-10)
    assert np.allclose(tau, np.mean(per, 0))


def test_dropping_half_of_a_class_is_predicted_to_raise_that_class_loss_and_does(one_thread):
    """The known effect: removing half of class 3's training images raises the loss of class 3's
    validation images; removing as many images of the other classes barely moves it. The
    prediction (calibrated, mean over 3 seeds' models) has the sign, is far above the other
    set's, and is within a factor 2 of the loss change measured by retraining the 3 seeds."""
    from pipeline.training.fit import fit
    from pipeline.training.infer import predict_logits
    from pipeline.training.recipe import Recipe

    x, y = _banded(24, 4, seed=0)
    xv, yv = _banded(12, 4, seed=1)
    recipe = Recipe(epochs=3, batch_size=16, track=0, device="cpu", workers=0, checkpoint_every=3)

    def runs(keep):
        return [fit(x[keep], y[keep], 4, replace(recipe, seed=s)) for s in range(3)]

    def class3_loss(rs):
        m = yv == 3
        return np.mean([F.cross_entropy(predict_logits(r.model, xv[m], r.mean, r.std).double(),
                                        torch.as_tensor(yv[m])).item() for r in rs])

    base = runs(np.ones(len(y), bool))
    c3 = yv == 3
    att = removal_effects([r.model for r in base], x, y, xv[c3], yv[c3], base[0].mean, base[0].std, k=256,
                          batch_size=64)
    half = np.zeros(len(y), bool)
    half[np.flatnonzero(y == 3)[:12]] = True
    other = np.zeros(len(y), bool)
    other[np.random.default_rng(0).choice(np.flatnonzero(y != 3), 12, replace=False)] = True
    pred_half, pred_other = att["effects"][:, half].sum(1), att["effects"][:, other].sum(1)
    assert (pred_half > 0).all()  # every seed's model agrees on the sign
    assert pred_half.mean() > 5 * abs(pred_other.mean())
    measured = class3_loss(runs(~half)) - class3_loss(base)
    assert measured > 0
    assert 0.5 <= pred_half.mean() / measured <= 2.0, (pred_half.mean(), measured, CALIBRATION)
