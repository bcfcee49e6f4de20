"""Per-sample gradient norms (pipeline/scores/engine.py, head.py, layers.py) against a per-sample backward loop.

Reference: for each sample, zero the grads, backward its own loss, flatten the grads of
the chosen parameter subset and take the norm. Everything is compared in float64.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.errors import CleanError
from pipeline.scores.engine import per_sample_grad_norms
from pipeline.head import (
    forward_logits_features,
    grad_vectors_last,
    last_layer_norms,
    last_layer_residual,
    project_last_layer_grads,
)

NORMS = ("l1", "l2", "linf")
SUBSETS = ("last", "weights", "biases", "all")
RTOL, ATOL = 1e-4, 1e-10


# ----------------------------------------------------------------------------- helpers
def subset_names(model: nn.Module, subset: str):
    """The subset definition, written independently of the implementation."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if subset == "all":
        return [n for n, _ in named]
    if subset == "weights":
        return [n for n, _ in named if n.split(".")[-1].endswith("weight")]
    if subset == "biases":
        return [n for n, _ in named if n.split(".")[-1].endswith("bias")]
    head = {id(p) for p in model.get_classifier().parameters()}
    return [n for n, p in named if id(p) in head]


def reference_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Per-sample gradients {name: [B, *shape]} from a loop of ordinary backward passes."""
    pd = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: [] for n in pd}
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        loss.backward()
        for n, p in pd.items():
            grads[n].append(p.grad.clone() if p.grad is not None else torch.zeros_like(p))
    model.zero_grad(set_to_none=True)
    return {n: torch.stack(v) for n, v in grads.items()}


def norms_of(grads, names, n):
    """{norm: [B]} of the flattened concatenation of grads[names]."""
    v = torch.cat([grads[k].reshape(n, -1) for k in names], 1) if names else torch.zeros(n, 1)
    return {"l1": v.abs().sum(1), "l2": v.norm(dim=1), "linf": v.abs().amax(1)}


def reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, subset: str):
    """{norm: [B]} from a per-sample loop of ordinary backward passes."""
    return norms_of(reference_grads(model, x, y), subset_names(model, subset), x.shape[0])


def check_all(model, x, y, subsets=SUBSETS, norms=NORMS):
    """Compare every norm × subset with the reference; return {layer: set of paths seen}."""
    paths = {}
    grads = reference_grads(model, x, y)
    with torch.no_grad():
        loss_ref = F.cross_entropy(model(x), y, reduction="none")
    for subset in subsets:
        ref = norms_of(grads, subset_names(model, subset), x.shape[0])
        for norm in norms:
            out = per_sample_grad_norms(model, x, y, norm=norm, params=subset, details=True)
            for k, v in out["paths"].items():
                paths.setdefault(k, set()).add(v)
            torch.testing.assert_close(
                out["grad_norm"], ref[norm], rtol=RTOL, atol=ATOL, msg=lambda m: f"{subset}/{norm}: {m}"
            )
            torch.testing.assert_close(out["loss"], loss_ref, rtol=1e-8, atol=1e-10)
    return paths


def randomize_norm_layers(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial running stats and affine params so the norm-layer formulas are tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))


class TimmLike(nn.Module):
    """Base: forward = forward_head(forward_features(x)) with the head `self.fc`."""

    def forward_head(self, x, pre_logits: bool = False):
        return x if pre_logits else self.fc(x)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class SmallCNN(TimmLike):
    def __init__(self, in_ch=3, n_cls=10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc = nn.Linear(16, n_cls)

    def forward_features(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return F.relu(self.fc1(x.flatten(1)))


class ConvZoo(TimmLike):
    """Strided / padded / grouped / dilated convs, padding modes, Conv1d, a bias-free head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2)
        self.c2 = nn.Conv2d(6, 6, (3, 2), stride=(1, 2), padding=(1, 0), groups=3, padding_mode="reflect")
        self.c3 = nn.Conv2d(6, 4, 2, padding="same", bias=False)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.c1d = nn.Conv1d(4, 5, 3, stride=2, padding=1, dilation=1, padding_mode="circular")
        self.fc = nn.Linear(5, 3, bias=False)

    def forward_features(self, x):
        x = torch.tanh(self.c1(x))
        x = torch.tanh(self.c2(x))
        x = torch.tanh(self.c3(x))
        x = torch.tanh(self.dw(x))
        x = torch.tanh(self.c1d(x.flatten(2)))  # [B, 4, H*W] as a sequence
        return x.mean(-1)


class Scale(nn.Module):
    """A custom layer with a raw parameter (torch.func local fallback)."""

    def __init__(self, d):
        super().__init__()
        self.alpha = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.alpha + self.alpha.square()


class Custom(TimmLike):
    """Sequence model: LayerNorm, GroupNorm, MHA (local + never-called out_proj), a Linear
    called twice, a raw root parameter, a frozen weight and a custom layer."""

    def __init__(self, d=8, n_cls=4):
        super().__init__()
        self.tok = nn.Parameter(torch.randn(1, 1, d) * 0.5)  # root param -> global fallback
        self.embed = nn.Linear(3, d)
        self.ln = nn.LayerNorm(d)
        self.gn = nn.GroupNorm(2, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.shared = nn.Linear(d, d)
        self.scale = Scale(d)
        self.frozen = nn.Linear(d, d)
        self.frozen.weight.requires_grad_(False)
        self.fc = nn.Linear(d, n_cls)

    def forward_features(self, x):  # x [B, T, 3]
        t = self.embed(x)
        t = torch.cat([self.tok.expand(t.shape[0], -1, -1), t], 1)
        t = self.ln(t)
        t = self.gn(t.transpose(1, 2)).transpose(1, 2)
        a, _ = self.attn(t, t, t, need_weights=False)
        t = t + a
        t = self.shared(torch.tanh(self.shared(t)))
        t = self.scale(t)
        return self.frozen(t).mean(1)


# ----------------------------------------------------------------------------- fixtures
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def timm():
    return pytest.importorskip("timm")


def _data(shape, n_cls, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, n_cls, (n,), generator=g)
    return x, y


# ----------------------------------------------------------------------------- tests
def test_small_cnn_matches_loop():
    torch.manual_seed(0)
    model = SmallCNN().double()
    randomize_norm_layers(model)
    model.eval()
    x, y = _data((3, 16, 16), 10)
    paths = check_all(model, x, y)
    assert paths["bn1"] == {"norm"} and paths["fc1"] == {"linear-rank1"}
    assert paths["conv1"] <= {"conv-mat", "conv-ghost"}


def test_resnet18_matches_loop(timm):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=3).double()
    randomize_norm_layers(model)
    model.eval()
    x, y = _data((3, 32, 32), 10)
    paths = check_all(model, x, y)
    kinds = set().union(*paths.values())
    assert {"conv-ghost", "conv-mat", "norm", "linear-rank1"} <= kinds
    assert not any("func" in k for k in kinds)


def test_conv_zoo_matches_loop():
    torch.manual_seed(0)
    model = ConvZoo().double().eval()
    x, y = _data((4, 9, 11), 3)
    paths = check_all(model, x, y)
    assert paths["c1d"] <= {"conv-mat", "conv-ghost"} and paths["dw"] <= {"conv-mat", "conv-ghost"}
    # bias-free head: the closed form drops the "+1" terms
    logits, h = forward_logits_features(model, x)
    ref = reference(model, x, y, "last")
    for norm in NORMS:
        torch.testing.assert_close(last_layer_norms(logits, h, y, norm, bias=False), ref[norm], rtol=RTOL, atol=ATOL)


def test_custom_fallbacks_match_loop():
    torch.manual_seed(0)
    model = Custom().double().eval()
    randomize_norm_layers(model)
    x, y = _data((5, 3), 4)
    paths = check_all(model, x, y)
    assert paths["scale"] == {"local-func"} and paths["attn"] == {"local-func"}
    assert paths["tok"] == {"global-func"} and paths["attn.out_proj.weight"] == {"global-func"}
    assert paths["ln"] == {"norm"} and paths["gn"] == {"norm"}
    assert paths["shared"] <= {"linear-ghost", "linear-mat"}


def test_vit_with_layer_scale_matches_loop(timm):
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=16, patch_size=8,
        embed_dim=16, depth=1, num_heads=2, init_values=0.5,
    ).double()
    randomize_norm_layers(model)
    model.eval()
    x, y = _data((3, 16, 16), 5, n=3)
    paths = check_all(model, x, y, subsets=("weights", "all"))
    assert paths["blocks.0.ls1"] == {"local-func"}
    assert paths["pos_embed"] == {"global-func"} and paths["cls_token"] == {"global-func"}
    assert paths["patch_embed.proj"] <= {"conv-mat", "conv-ghost"}


def test_convnext_matches_loop(timm):
    torch.manual_seed(0)
    model = timm.create_model(
        "convnext_atto", pretrained=False, num_classes=4, depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), kernel_sizes=3,
        ls_init_value=0.5, conv_mlp=False,
    ).double()
    randomize_norm_layers(model)
    model.eval()
    x, y = _data((3, 32, 32), 4, n=3)
    paths = check_all(model, x, y, subsets=("weights", "all"))
    assert paths["stem.1"] == {"norm"}  # timm LayerNorm2d, channels first
    assert paths["stages.0.blocks.0"] == {"local-func"}  # the block's own gamma


def test_timm_norm_act_fast_path_matches_loop(timm):
    """timm BatchNormAct2d (norm → drop → act in one module) takes the 'norm' path, not torch.func."""
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=5).double()
    randomize_norm_layers(model)
    model.eval()
    x, y = _data((3, 32, 32), 5, n=2)
    paths = check_all(model, x, y, subsets=("weights", "all"))
    assert paths["bn1"] == {"norm"} and type(model.bn1).__name__ == "BatchNormAct2d"
    assert not any("func" in p for v in paths.values() for p in v)


def test_cache_tiles_and_row_blocks(monkeypatch):
    """Tiny tile budget: one sample per chunk and one output row per block; same numbers."""
    import pipeline.scores.layers as gn

    torch.manual_seed(0)
    model = SmallCNN().double()
    randomize_norm_layers(model)
    model.eval()
    x, y = _data((3, 16, 16), 10, n=3)
    monkeypatch.setattr(gn, "_TILE_BYTES", 64)
    check_all(model, x, y, subsets=("all",))
    custom = Custom().double().eval()  # sequence Linear: linear-mat in row blocks
    xs, ys = _data((5, 3), 4, n=3)
    assert "linear-mat" in check_all(custom, xs, ys, subsets=("weights",))["shared"]


def test_in_place_modified_input_is_recomputed():
    class M(TimmLike):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6, 6)
            self.b.weight.requires_grad_(False)  # b does not need its input for backward...
            self.fc = nn.Linear(6, 3)

        def forward_features(self, x):
            t = self.a(x)
            u = self.b(t)
            t.mul_(2)  # ...so autograd allows this in-place edit of b's input
            return torch.tanh(u + t)

    torch.manual_seed(0)
    model = M().double().eval()
    x, y = _data((4,), 3, n=5)
    check_all(model, x, y, subsets=("all",))


def test_input_preprocessed_before_first_module():
    """No leaf module sees the raw input (an op on x comes first): the input-grad path is used."""
    import pipeline.scores.engine as gn

    class Pre(SmallCNN):
        def forward_features(self, x):
            return super().forward_features(x * 2 - 1)

    torch.manual_seed(0)
    model = Pre().double()
    randomize_norm_layers(model)
    model.eval()
    x, y = _data((3, 16, 16), 10, n=3)
    check_all(model, x, y, subsets=("all",))
    assert model in gn._NO_ROOT


def test_batch_size_invariance():
    torch.manual_seed(0)
    model = SmallCNN()
    randomize_norm_layers(model)
    model.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (12,), generator=g)
    for subset, norm in (("all", "l2"), ("weights", "l1"), ("biases", "linf"), ("last", "l2")):
        full = per_sample_grad_norms(model, x, y, norm=norm, params=subset)
        parts = [per_sample_grad_norms(model, x[s : s + 5], y[s : s + 5], norm=norm, params=subset) for s in (0, 5, 10)]
        for key in ("grad_norm", "loss", "logits", "h"):
            torch.testing.assert_close(torch.cat([p[key] for p in parts]), full[key], rtol=1e-5, atol=1e-6)
    # tiny memory budget: many chunks, same numbers
    a = per_sample_grad_norms(model, x, y, norm="l2", params="all")["grad_norm"]
    b = per_sample_grad_norms(model, x, y, norm="l2", params="all", mem_budget_mb=0.01)["grad_norm"]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_last_closed_form_equals_reference():
    torch.manual_seed(0)
    model = SmallCNN().double()
    randomize_norm_layers(model)
    model.eval()
    x, y = _data((3, 16, 16), 10, n=6)
    ref = reference(model, x, y, "last")
    logits, h = forward_logits_features(model, x)
    for norm in NORMS:
        torch.testing.assert_close(last_layer_norms(logits, h, y, norm), ref[norm], rtol=RTOL, atol=ATOL)
        out = per_sample_grad_norms(model, x, y, norm=norm, params="last", details=True)
        assert out["paths"] == {"": "last-closed-form"}
        torch.testing.assert_close(out["grad_norm"], ref[norm], rtol=RTOL, atol=ATOL)
    # grad vectors equal the head's actual per-sample gradients
    vec = grad_vectors_last(logits, h, y)
    for i in range(2):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        want = torch.cat([model.fc.weight.grad.flatten(), model.fc.bias.grad])
        torch.testing.assert_close(vec[i], want, rtol=1e-8, atol=1e-12)


def test_random_projection_deterministic_and_exact():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(7, 5, generator=g, dtype=torch.float64)
    h = torch.randn(7, 6, generator=g, dtype=torch.float64)
    p1 = project_last_layer_grads(r, h, dim=20, seed=3)
    p2 = project_last_layer_grads(r.clone(), h.clone(), dim=20, seed=3)
    assert torch.equal(p1, p2)
    assert not torch.allclose(p1, project_last_layer_grads(r, h, dim=20, seed=4))
    # batch independence
    torch.testing.assert_close(project_last_layer_grads(r[:3], h[:3], dim=20, seed=3), p1[:3])
    # equals projecting the explicitly materialised vec(r ⊗ h) ⊕ r
    from pipeline.head import _projection

    P, Pb = _projection(5, 6, 20, 3, torch.float64, r.device)
    full = torch.cat([P.reshape(20, -1), Pb], 1)
    explicit = torch.cat([(r[:, :, None] * h[:, None, :]).reshape(7, -1), r], 1)
    torch.testing.assert_close(p1, explicit @ full.T, rtol=1e-10, atol=1e-12)
    # the streaming path (projection too big to cache) gives the same numbers
    import pipeline.head as gn

    old = gn._PROJ_CACHE_MAX_ELEMS
    try:
        gn._PROJ_CACHE_MAX_ELEMS = 10
        torch.testing.assert_close(project_last_layer_grads(r, h, dim=20, seed=3), p1, rtol=1e-10, atol=1e-12)
    finally:
        gn._PROJ_CACHE_MAX_ELEMS = old
    # squared norms roughly preserved (JL)
    big = project_last_layer_grads(r, h, dim=4000, seed=0)
    ratio = big.square().sum(1) / explicit.square().sum(1)
    assert ((ratio > 0.8) & (ratio < 1.2)).all()
    # consistent with the residual helper on real logits
    logits = torch.randn(7, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (7,), generator=g)
    P8, Pb8 = _projection(5, 6, 8, 1, torch.float64, r.device)
    torch.testing.assert_close(
        project_last_layer_grads(last_layer_residual(logits, y), h, dim=8, seed=1),
        grad_vectors_last(logits, h, y) @ torch.cat([P8.reshape(8, -1), Pb8], 1).T,
    )


def test_bad_arguments():
    model = SmallCNN().eval()
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    with pytest.raises(CleanError, match="norm"):
        per_sample_grad_norms(model, x, y, norm="l3")
    with pytest.raises(CleanError, match="subset"):
        per_sample_grad_norms(model, x, y, params="heads")
    model.train()
    with pytest.raises(CleanError, match="eval"):
        per_sample_grad_norms(model, x, y)


def test_requires_grad_restored_and_frozen_params_excluded():
    torch.manual_seed(0)
    model = SmallCNN().double().eval()
    model.conv1.weight.requires_grad_(False)
    x, y = _data((3, 16, 16), 10, n=3)
    ref = reference(model, x, y, "all")
    out = per_sample_grad_norms(model, x, y, norm="l2", params="all")
    torch.testing.assert_close(out["grad_norm"], ref["l2"], rtol=RTOL, atol=ATOL)
    assert [p.requires_grad for p in model.parameters()] == [n != "conv1.weight" for n, _ in model.named_parameters()]
    assert math.isfinite(float(out["grad_norm"].sum()))
