"""Speed and memory of per-sample gradient-norm scoring vs. inference and a training step.

Usage:  python bench/score_speed.py [--n 512] [--batch-size 128] [--models cnn,resnet18]
                                    [--reps 3] [--loop-n 32] [--func-n 64] [--no-memory]

Models (random init, eval mode for scoring, the same weights for every method):
  * ``cnn``      – the classic 2-conv + 2-fc MNIST net (conv 1→32 3×3, conv 32→64 3×3,
                   max-pool, fc 9216→128, fc 128→10) on 28×28×1 inputs.
  * ``resnet18`` – timm ``resnet18`` (BatchNorm, num_classes=10) on 32×32×3 inputs.
Data: the first n Fashion-MNIST training images when
/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz exists (zero-padded to 32×32 and
repeated to 3 channels for resnet18), otherwise Gaussian noise.

Methods (all on the same batches):
  infer             model(x) under torch.no_grad()
  train             one SGD step: train mode, forward, mean CE, backward, optimizer.step()
                    (on a copy of the model, so the scored weights do not move)
  last/<norm>       per_sample_grad_norms(params="last"): one no-grad forward + closed form
  weights|all/<n>   per_sample_grad_norms(params=..., norm=n): hooked forward, one backward to
                    the input, per-layer per-sample norms (ghost / rank-1 / chunked)
  loop              per-sample loop: batch-1 forward+backward, norm of all grads (timed on the
                    first --loop-n samples, scaled to 1,000)
  torch.func        vmap(grad(functional_call)) over --func-chunk samples at a time, all params,
                    l2 (timed on the first --func-n samples, scaled to 1,000)
  opacus ghost      Opacus GradSampleModuleFastGradientClipping(use_ghost_clipping=True,
    (all/l2)        loss_reduction="sum"): forward, summed CE, backward, get_norm_sample() = per-sample
                    l2 over all trainable params (ghost norms for Linear, per-sample grads for conv).
                    Run on a deep copy of the model. Opacus captures activations only for modules in
                    train mode, so the modules it hooks (those with their own trainable params) are
                    switched to train mode, everything else stays in eval mode. Opacus refuses
                    modules with buffers (BatchNorm), strict or not; when it does, the refusal is
                    printed and the row "opacus ghost (all/l2) [eval-BN shim]" runs it with every
                    BatchNorm replaced by a buffer-free module computing the same eval-mode
                    batch_norm with the same weight/bias, plus a copy of its output (timm's
                    in-place ReLU / ``x += shortcut`` after BatchNorm is not allowed on the output of
                    a module with a full backward hook); Opacus then uses its functorch fallback for
                    those layers.
  backpack          BackPACK BatchL2Grad: extend(deep copy of the model) — with use_converter=True
    (all/l2)        only if the plain extend fails on a probe batch (timm's in-place residual add) —
                    forward, summed CE, backward inside ``with backpack(BatchL2Grad())``, then
                    sqrt(Σ_params p.batch_l2). Eval mode (BatchNorm on running statistics).
  val_influence     TracIn train→validation, the per-checkpoint work on the training samples:
    last / all      pipeline.scores.influence.grad_dots(model, x, y, v, params) with v the mean
                    validation gradient (computed once beforehand): ``last`` the head closed form
                    r_iᵀ G_W h_i + r_i·g_b (one no-grad forward), ``all`` forward-mode jvp of the
                    per-sample loss vector along v (no per-sample gradient)
  val_influence     the same dot products by per-layer ghost dot products Σ_t g_tᵀ V a_t in hooks
    all [ghost]     (one forward, one backward to the first layer's output; conv / linear /
                    BatchNorm only: a measurement prototype, the alternative jvp was chosen over)
  val grad last|all val_gradient(model, [(x, y)], params): the validation gradient itself, per
                    1,000 validation samples (computed once per checkpoint on the val split; the
                    "targets" section adds it at --val-ratio validation samples per training sample)
  Both need the optional ``bench`` extra; without it they are reported as skipped. Before the
  timing, each is checked on the first batch against per_sample_grad_norms(model, x, y, "l2",
  "all") (rtol 1e-3); a row that does not match is marked "(mismatch)".

Time: seconds per 1,000 samples. Every repetition runs all methods back to back on the same
batches (interleaved, so background load hits them alike); the table reports the minimum over
--reps repetitions, after one warm-up batch per method.

Memory ("peak MB"): each method runs in a fresh subprocess that builds the same model and one
batch, records its resident set size (VmRSS), resets the kernel's high-water mark
(``echo 5 > /proc/self/clear_refs``), runs the method on the batch twice and reads VmHWM.
Reported: VmHWM − baseline VmRSS, i.e. the extra physical memory the method needed on top of
model + data. This counts everything the process touched (activations, gradients, per-sample
temporaries, oneDNN scratch), not just live tensors — coarse but honest, and the same
yardstick for every method. Workers run with MALLOC_MMAP_THRESHOLD_=131072 so that glibc
returns large blocks to the OS at once; without it the reading depends on heap fragmentation
and varies by ±20 % between identical runs. Where clear_refs is unavailable it falls back to
ru_maxrss (which cannot be reset, so small methods may read 0). The loop's and torch.func's
peaks are at their own granularity (one sample; one vmap chunk of --func-chunk samples).
"""
from __future__ import annotations

import argparse
import copy
import gc
import gzip
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.scores.engine import per_sample_grad_norms  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
FMNIST_LABELS = Path("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz")


# ----------------------------------------------------------------------------- models / data
class MnistCNN(nn.Module):
    """pytorch/examples MNIST net with the timm API."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.fc1 = nn.Linear(9216, 128)
        self.fc = nn.Linear(128, num_classes)

    def forward_features(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return x.flatten(1)

    def forward_head(self, x, pre_logits: bool = False):
        x = F.relu(self.fc1(x))
        return x if pre_logits else self.fc(x)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "cnn":
        return MnistCNN().eval()
    if name == "resnet18":
        import timm

        return timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=3).eval()
    raise SystemExit(f"unknown model {name!r} (choose cnn, resnet18)")


def load_data(name: str, n: int):
    """(x [n, C, H, W] float32, y [n] long, source string)."""
    if FMNIST.exists() and FMNIST_LABELS.exists():
        with gzip.open(FMNIST, "rb") as f:
            f.read(16)
            raw = np.frombuffer(f.read(n * 784), dtype=np.uint8)
        with gzip.open(FMNIST_LABELS, "rb") as f:
            f.read(8)
            labels = np.frombuffer(f.read(n), dtype=np.uint8)
        m = raw.size // 784
        x = torch.from_numpy(raw[: m * 784].reshape(m, 1, 28, 28).astype(np.float32) / 255.0)
        x = (x - 0.286) / 0.353
        y = torch.from_numpy(labels[:m].astype(np.int64))
        if m < n:  # fewer images than asked: repeat
            reps = -(-n // m)
            x, y = x.repeat(reps, 1, 1, 1)[:n], y.repeat(reps)[:n]
        src = "Fashion-MNIST"
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        src = "random"
    if name == "resnet18":
        x = F.pad(x, (2, 2, 2, 2)).repeat(1, 3, 1, 1)
    return x.contiguous(), y, src


# ----------------------------------------------------------------------------- methods
def _loop_norms(model, x, y):
    params = [p for p in model.parameters() if p.requires_grad]
    out = torch.empty(x.shape[0])
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        out[i] = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params])))
    return out


def _func_norms(model, x, y, chunk):
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def f(p, xi, yi):
        return F.cross_entropy(functional_call(model, (p, buffers), (xi.unsqueeze(0),)), yi.unsqueeze(0))

    g = vmap(grad(f), in_dims=(None, 0, 0))
    outs = []
    for s in range(0, x.shape[0], chunk):
        per = g(params, x[s : s + chunk], y[s : s + chunk])
        sq = sum(v.reshape(v.shape[0], -1).square().sum(1) for v in per.values())
        del per
        outs.append(sq.sqrt())
    return torch.cat(outs)


def build_methods(model: nn.Module, args, probe=None, notes: list | None = None) -> dict:
    """name -> (fn(x_batch, y_batch), kind) ; kind in {batch, loop, func}.

    ``probe`` = (x, y) of a couple of samples, used to test BackPACK's extend; ``notes``
    collects why an external method is missing or how it was made to run."""
    notes = [] if notes is None else notes
    train_model = copy.deepcopy(model)
    opt = torch.optim.SGD(train_model.parameters(), lr=0.01)

    def infer(x, y):
        with torch.no_grad():
            model(x)

    def train(x, y):
        train_model.train()
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(train_model(x), y).backward()
        opt.step()

    methods = {"infer": (infer, "batch"), "train": (train, "batch")}
    for subset in ("last", "weights", "all"):
        for norm in ("l1", "l2", "linf"):
            if subset == "last" and norm != "l2":
                continue  # the closed form costs the same for every norm
            methods[f"{subset}/{norm}"] = (
                (lambda x, y, s=subset, n=norm: per_sample_grad_norms(model, x, y, norm=n, params=s)),
                "batch",
            )
    methods.update(_influence_methods(model, probe))
    methods["loop (all/l2)"] = ((lambda x, y: _loop_norms(model, x, y)), "loop")
    methods["torch.func (all/l2)"] = ((lambda x, y: _func_norms(model, x, y, args.func_chunk)), "func")
    if getattr(args, "only_influence", False):
        return {k: m for k, m in methods.items() if k in ("infer", "train") or "val" in k}
    if not args.no_external:
        methods.update(_opacus_methods(model, notes))
        if probe is not None:
            methods.update(_backpack_methods(model, probe[0], probe[1], notes))
    return methods


# ----------------------------------------------------------------------------- val_influence
def _ghost_dots(model: nn.Module, x, y, v: dict) -> torch.Tensor:
    """Σ_layers ⟨∇_θl L_i, v_l⟩ by ghost dot products (conv: ⟨g, conv(a; V)⟩; linear: ⟨g, a Vᵀ⟩;
    BatchNorm: Σ g·x̂ · v_w + Σ g · v_b) from hooks: one forward, one backward, no per-sample grads."""
    out = torch.zeros(x.shape[0], dtype=x.dtype)
    names = {id(m): n for n, m in model.named_modules()}
    handles, params = [], [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]

    def hook(m, args, o):
        a, n = args[0], names[id(m)]

        def on_grad(g):
            nonlocal out
            if isinstance(m, nn.Conv2d):
                out += (F.conv2d(a, v[n + ".weight"], None, m.stride, m.padding, m.dilation, m.groups) * g).flatten(1).sum(1)
                if m.bias is not None:
                    out += g.sum((2, 3)) @ v[n + ".bias"]
            elif isinstance(m, nn.Linear):
                out += ((a @ v[n + ".weight"].T) * g).sum(1) + (g @ v[n + ".bias"] if m.bias is not None else 0)
            else:
                xh = (a - m.running_mean[None, :, None, None]) * torch.rsqrt(m.running_var + m.eps)[None, :, None, None]
                out += (g * xh).sum((2, 3)) @ v[n + ".weight"] + g.sum((2, 3)) @ v[n + ".bias"]

        o.register_hook(on_grad)

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            handles.append(m.register_forward_hook(hook))
    try:
        for p in params:
            p.requires_grad_(False)
        xr = x.detach().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return out


def _influence_methods(model: nn.Module, probe) -> dict:
    """val_influence's per-checkpoint pieces with a fixed v (the gradient of a probe 'validation' batch)."""
    from pipeline.scores.influence import grad_dots, val_gradient

    if probe is None:
        return {}
    xv, yv = probe
    v = {s: val_gradient(model, [(xv, yv)], s) for s in ("last", "all")}
    out = {f"val_influence {s}": ((lambda x, y, s=s: grad_dots(model, x, y, v[s], s)), "batch") for s in ("last", "all")}
    covered = all(isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)) for m in model.modules()
                  if any(True for _ in m.parameters(recurse=False)))
    if covered:
        ref = grad_dots(model, xv, yv, v["all"], "all")
        got = _ghost_dots(model, xv, yv, v["all"])
        assert torch.allclose(got, ref, rtol=1e-3, atol=1e-4 * ref.abs().max()), "ghost dots differ from jvp"
        out["val_influence all [ghost]"] = ((lambda x, y: _ghost_dots(model, x, y, v["all"])), "batch")
    for s in ("last", "all"):
        out[f"val grad {s}"] = ((lambda x, y, s=s: val_gradient(model, [(x, y)], s)), "batch")
    return out


# ----------------------------------------------------------------------------- Opacus / BackPACK
EXTERNAL = ("opacus ghost (all/l2)", "opacus ghost (all/l2) [eval-BN shim]", "backpack (all/l2)")


def _short(e: BaseException, n: int = 240) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:n]}{'…' if len(msg) > n else ''}"


class _EvalBatchNormCore(nn.Module):
    """Buffer-free eval-mode batch_norm: the same Parameter objects as the BatchNorm it
    replaces, running statistics held as plain tensor attributes (Opacus rejects buffers)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.weight, self.bias = bn.weight, bn.bias
        self.rm = bn.running_mean.detach().clone()
        self.rv = bn.running_var.detach().clone()
        self.eps = bn.eps

    def forward(self, x):
        return F.batch_norm(x, self.rm, self.rv, self.weight, self.bias, False, 0.0, self.eps)


class _EvalBatchNorm(nn.Module):
    """Wraps the core and returns a copy of its output: Opacus puts a full backward hook on the
    core, whose output is then a view that autograd forbids modifying in place, and timm's
    ResNet does exactly that right after BatchNorm (ReLU(inplace=True), ``x += shortcut``)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.core = _EvalBatchNormCore(bn)

    def forward(self, x):
        return self.core(x).clone()


def _replace_batchnorm(module: nn.Module) -> int:
    n = 0
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and child.track_running_stats:
            setattr(module, name, _EvalBatchNorm(child))
            n += 1
        else:
            n += _replace_batchnorm(child)
    return n


def _quiet_hook_warnings():
    import warnings

    warnings.filterwarnings("ignore", message=".*does not have an extension for Module.*")
    warnings.filterwarnings("ignore", message="Full backward hook is firing.*")


def _opacus_methods(model: nn.Module, notes: list) -> dict:
    try:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
    except Exception as e:  # noqa: BLE001
        notes.append(f"opacus: not installed (optional `bench` extra) — skipped ({_short(e, 80)})")
        return {}
    import logging

    logging.getLogger("opacus").setLevel(logging.ERROR)
    _quiet_hook_warnings()

    def wrap(m: nn.Module, strict: bool):
        gsm = GradSampleModuleFastGradientClipping(
            m, batch_first=True, loss_reduction="sum", strict=strict, use_ghost_clipping=True
        )
        gsm.eval()
        for sub in m.modules():  # Opacus only captures activations of modules in train mode
            if any(p.requires_grad for p in sub.parameters(recurse=False)):
                sub.train()
        return gsm

    def runner(gsm):
        def fn(x, y):
            gsm.zero_grad(set_to_none=True)
            F.cross_entropy(gsm(x), y, reduction="sum").backward()
            return gsm.get_norm_sample().detach()

        return fn

    gsm, errors = None, []
    for strict in (True, False):
        try:
            gsm = wrap(copy.deepcopy(model), strict)
            break
        except Exception as e:  # noqa: BLE001
            errors.append(f"strict={strict}: {_short(e)}")
    if gsm is not None:
        return {EXTERNAL[0]: (runner(gsm), "batch")}
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    notes.append(
        f"opacus ghost (all/l2): not supported{' (BatchNorm)' if has_bn else ''} — " + "; ".join(errors)
    )
    if not has_bn:
        return {}
    shim = copy.deepcopy(model)
    k = _replace_batchnorm(shim)
    try:
        gsm = wrap(shim, True)
    except Exception as e:  # noqa: BLE001
        notes.append(f"{EXTERNAL[1]}: failed too — {_short(e)}")
        return {}
    notes.append(
        f"{EXTERNAL[1]}: measured instead, with the {k} BatchNorm layers replaced by a buffer-free "
        "eval-mode batch_norm (same weights; Opacus's functorch fallback computes their norms)"
    )
    return {EXTERNAL[1]: (runner(gsm), "batch")}


def _backpack_methods(model: nn.Module, x_probe, y_probe, notes: list) -> dict:
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchL2Grad
    except Exception as e:  # noqa: BLE001
        notes.append(f"backpack: not installed (optional `bench` extra) — skipped ({_short(e, 80)})")
        return {}
    _quiet_hook_warnings()

    def runner(bp):
        params = [p for p in bp.parameters() if p.requires_grad]

        def fn(x, y):
            bp.zero_grad(set_to_none=True)
            loss = F.cross_entropy(bp(x), y, reduction="sum")
            with backpack(BatchL2Grad()):
                loss.backward()
            return torch.stack([p.batch_l2 for p in params]).sum(0).sqrt()

        return fn

    errors = []
    for conv in (False, True):
        try:
            bp = extend(copy.deepcopy(model), use_converter=conv)
            fn = runner(bp)
            fn(x_probe, y_probe)  # the plain extend of a model with in-place ops fails here
        except Exception as e:  # noqa: BLE001
            errors.append(f"use_converter={conv}: {_short(e)}")
            continue
        if errors:
            notes.append(f"backpack (all/l2): needed use_converter=True (plain extend: {errors[0]})")
        return {EXTERNAL[2]: (fn, "batch")}
    notes.append("backpack (all/l2): not supported — " + "; ".join(errors))
    return {}


# ----------------------------------------------------------------------------- memory worker
# ----------------------------------------------------------------------------- memory worker
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def mem_worker(model_name: str, method: str, args) -> dict:
    model = make_model(model_name)
    x, y, _ = load_data(model_name, args.batch_size)
    fn, kind = build_methods(model, args, probe=(x[:2], y[:2]))[method]
    if kind == "loop":  # its peak does not grow with the number of samples
        x, y = x[: min(args.loop_n, len(x))], y[: min(args.loop_n, len(y))]
    if kind == "func":  # one vmap chunk at a time: two chunks show the steady-state peak
        x, y = x[: 2 * args.func_chunk], y[: 2 * args.func_chunk]
    gc.collect()
    base = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        how = "VmHWM"
    except OSError:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        how = "ru_maxrss"
    for _ in range(2):
        fn(x, y)
    peak = _status_kb("VmHWM") if how == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mb": max(0, peak - base) / 1024.0, "how": how}


def measure_memory(model_name: str, method: str, args) -> float:
    cmd = [
        sys.executable, __file__, "--_mem-worker", model_name, method,
        "--batch-size", str(args.batch_size), "--loop-n", str(args.loop_n),
        "--func-chunk", str(args.func_chunk), "--threads", str(args.threads),
    ] + (["--only-influence"] if args.only_influence else [])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if r.returncode != 0:
        print(f"  memory worker failed for {model_name}/{method}: {r.stderr.strip()[-300:]}", file=sys.stderr)
        return float("nan")
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_mb"]


# ----------------------------------------------------------------------------- timing
def time_model(model_name: str, args):
    """Seconds per 1,000 samples for every method.

    Work is cut into units (a batch; one sample for the loop; one vmap chunk for
    torch.func) and the units of all methods are run round-robin, so a burst of
    background load hits every method alike. Each unit's time is the minimum over
    --reps repetitions; a method's time is the sum over its units, scaled to 1,000.
    """
    model = make_model(model_name)
    x, y, src = load_data(model_name, args.n)
    notes: list = []
    methods = build_methods(model, args, probe=(x[:2], y[:2]), notes=notes)
    bs = args.batch_size
    step = {"batch": bs, "loop": 1, "func": args.func_chunk}
    limit = {"batch": len(x), "loop": min(args.loop_n, len(x)), "func": min(args.func_n, len(x))}
    units = {
        name: [slice(s, min(limit[kind], s + step[kind])) for s in range(0, limit[kind], step[kind])]
        for name, (fn, kind) in methods.items()
    }
    # correctness of the external methods on the first batch: per-sample l2 over all params
    checks = {}
    ext = [name for name in methods if name in EXTERNAL]
    if ext:
        sl = slice(0, min(bs, len(x)))
        ref = per_sample_grad_norms(model, x[sl], y[sl], norm="l2", params="all")["grad_norm"].detach()
        for name in ext:
            try:
                got = methods[name][0](x[sl], y[sl]).detach().reshape(-1).to(ref.dtype)
            except Exception as e:  # noqa: BLE001
                notes.append(f"{name}: failed on the first batch, left out — {_short(e)}")
                del methods[name]
                continue
            ok = got.shape == ref.shape and torch.allclose(got, ref, rtol=1e-3, atol=1e-6)
            rel = ((got - ref).abs() / ref.abs().clamp_min(1e-12)).max().item() if got.shape == ref.shape else math.inf
            checks[name] = (ok, rel)
            print(
                f"  [{model_name}] check {name} vs per_sample_grad_norms(l2, all), first {sl.stop} samples: "
                f"{'match' if ok else 'MISMATCH'} (max rel. diff {rel:.1e})",
                file=sys.stderr, flush=True,
            )
    for name, (fn, kind) in methods.items():  # warm-up (allocator, oneDNN primitives)
        sl = units[name][0]
        fn(x[sl], y[sl])
    best = {name: [math.inf] * len(u) for name, u in units.items()}
    longest = max(len(u) for u in units.values())
    for rep in range(args.reps):
        for i in range(longest):
            for name, (fn, kind) in methods.items():
                if i >= len(units[name]):
                    continue
                sl = units[name][i]
                t0 = time.perf_counter()
                fn(x[sl], y[sl])
                best[name][i] = min(best[name][i], time.perf_counter() - t0)
        print(f"  [{model_name}] rep {rep + 1}/{args.reps} done", file=sys.stderr, flush=True)
    per1000 = {name: sum(best[name]) * 1000.0 / limit[methods[name][1]] for name in methods}
    return per1000, src, checks, notes


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=512, help="samples timed per method (default 512)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--models", default="cnn,resnet18")
    ap.add_argument("--reps", type=int, default=3, help="repetitions; the minimum is reported")
    ap.add_argument("--loop-n", type=int, default=32, help="samples timed for the per-sample loop")
    ap.add_argument("--func-n", type=int, default=64, help="samples timed for torch.func")
    ap.add_argument("--func-chunk", type=int, default=16, help="vmap chunk for torch.func")
    ap.add_argument("--val-ratio", type=float, default=1 / 9,
                    help="validation samples per training sample for val_influence's targets (default 1/9: "
                    "data.val_frac 0.1 of the training part)")
    ap.add_argument("--only-influence", action="store_true",
                    help="time only infer, train and the val_influence rows")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    ap.add_argument("--no-external", action="store_true", help="leave out Opacus and BackPACK")
    ap.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (default 1: on a shared 2-core box, OpenMP barriers of a 2-thread "
        "run stall whenever another process holds a core, which swamps the comparison)",
    )
    ap.add_argument("--_mem-worker", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args._mem_worker:
        print(json.dumps(mem_worker(args._mem_worker[0], args._mem_worker[1], args)))
        return

    print(
        f"# per-sample gradient-norm scoring — torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"n={args.n}, batch={args.batch_size}, min of {args.reps} interleaved reps\n"
    )
    summary = []
    for model_name in [m.strip() for m in args.models.split(",") if m.strip()]:
        best, src, checks, notes = time_model(model_name, args)
        mem = {}
        if not args.no_memory:
            for name in best:
                mem[name] = measure_memory(model_name, name, args)
                print(f"  [{model_name}] memory {name}: {mem[name]:.0f} MB", file=sys.stderr, flush=True)
        tr, tm = best["train"], mem.get("train", float("nan"))
        print(f"## {model_name} ({src} data)\n")
        print("| method | s / 1,000 samples | × train step | samples/s | peak MB (batch) | × train mem |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, t in best.items():
            m = mem.get(name, float("nan"))
            label = name + (" (mismatch)" if name in checks and not checks[name][0] else "")
            print(
                f"| {label} | {t:.3f} | {t / tr:.2f} | {1000.0 / t:.0f} | "
                f"{m:.0f} | {m / tm if tm and tm == tm and tm > 0 else float('nan'):.2f} |"
            )
        print()
        summary.append((model_name, best, mem, checks, notes))

    print("## targets\n")
    for model_name, best, mem, _, _ in summary:
        inf, tr, q = best["infer"], best["train"], args.val_ratio
        last = best["val_influence last"] + q * best["val grad last"]
        all_ = best["val_influence all"] + q * best["val grad all"]
        print(f"- {model_name}: val_influence per checkpoint, training-sample pass + validation gradient at "
              f"{q:.3f} val samples per training sample:")
        print(f"  - last: {best['val_influence last'] / inf:.2f}× inference + {q * best['val grad last'] / inf:.2f}× "
              f"= {last / inf:.2f}× inference (target ≤ 1.1×: {'OK' if last / inf <= 1.1 else 'MISSED'})")
        ghost = (f"; ghost-dot prototype {best['val_influence all [ghost]'] / tr:.2f}× + {q * best['val grad all'] / tr:.2f}×"
                 if "val_influence all [ghost]" in best else "")
        print(f"  - all (jvp): {best['val_influence all'] / tr:.2f}× train step + {q * best['val grad all'] / tr:.2f}× "
              f"= {all_ / tr:.2f}× train step (target ≤ 2×: {'OK' if all_ / tr <= 2 else 'MISSED'}){ghost}")
        if args.only_influence:
            continue
        chk = [
            ("last ≥ 0.95× inference throughput", inf / best["last/l2"] >= 0.95, f"{inf / best['last/l2']:.2f}×"),
            ("all/l2 ≤ 1.3× train step", best["all/l2"] / tr <= 1.3, f"{best['all/l2'] / tr:.2f}×"),
        ]
        slow_ref = min(best["loop (all/l2)"], best["torch.func (all/l2)"])
        for k in ("weights/l1", "weights/linf", "all/l1", "all/linf"):
            chk.append(
                (f"{k} faster than loop and torch.func", best[k] < slow_ref, f"{slow_ref / best[k]:.1f}× faster")
            )
        if mem:
            tm = mem["train"]
            worst = max((mem[k], k) for k in mem if k.split("/")[0] in ("last", "weights", "all"))
            chk.append(
                ("peak memory ≤ 1.5× train step", worst[0] <= 1.5 * tm, f"worst {worst[1]}: {worst[0] / tm:.2f}×")
            )
        for what, ok, val in chk:
            print(f"- {model_name}: {what}: {'OK' if ok else 'MISSED'} ({val})")
    print()
    if args.no_external or args.only_influence:
        return
    print("## Opacus / BackPACK (per-sample l2 over all params)\n")
    for model_name, best, mem, checks, notes in summary:
        tr, ours = best["train"], best["all/l2"]
        tm = mem.get("train", float("nan"))
        for name in EXTERNAL:
            if name not in best:
                continue
            ok, rel = checks.get(name, (False, math.inf))
            mtxt = f", memory {mem[name] / tm:.2f}× train" if name in mem and tm == tm and tm > 0 else ""
            print(
                f"- {model_name}: {name}: {best[name] / tr:.2f}× train step, {best[name] / ours:.2f}× all/l2{mtxt}; "
                f"{'matches' if ok else 'DOES NOT match'} per_sample_grad_norms (max rel. diff {rel:.1e}, rtol 1e-3)"
            )
        for note in notes:
            print(f"- {model_name}: {note}")


if __name__ == "__main__":
    main()
