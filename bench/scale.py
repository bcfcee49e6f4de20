"""Scale: `clean score` throughput with 1 vs N processes (torchrun) on CPU, and train/score
images/s on a GPU when one is present.

Usage:  python bench/scale.py [--n 4096] [--procs 1,2] [--subset all] [--epochs 1]
                              [--stream] [--gpu-n 60000] [--gpu-epochs 2] [--gpu-model small_cnn]
                              [--keep DIR]

Data: the first --n Fashion-MNIST training images when
/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz exists, else random 28×28 images;
written as IDX files and read through `clean prepare --source fashion-mnist` (no val split).

CPU: one `small_cnn` is trained for --epochs (in this process); then the same `clean score`
(every column, gradient norms over --subset, self-influence over the epoch checkpoints) runs
as a fresh process: `python -m cli.main score` for 1 process and `torchrun --standalone
--nproc-per-node P -m cli.main score` for P > 1, with OMP_NUM_THREADS = cores // P so every
setting uses the same cores (so 1 vs P also differ in threads per process, and the scores
in the last bits). Reported: the seconds `score` itself took (meta.json: model
load, decode, all passes, gather, writing; not Python/torch start-up), images scored per
second (N × passes / seconds), the speed-up over 1 process, and the wall time of the whole
command. Each P>1 result is checked against 1 process (same ids, max relative difference).
--stream adds a 1-process run with data.cache_max_gb 0 (streamed decode, 2 workers).

GPU (only when torch.cuda.is_available()): `clean train` on --gpu-n images (train.amp auto,
channels_last) and `clean score` on them, in this process; reports the device name, train
images/s (metrics.json samples_per_s) and score images/s.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FM = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    head = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(head + arr.tobytes(), compresslevel=1, mtime=0))


def make_data(work: Path, n: int) -> Path:
    """IDX files with n training images (+ 100 test) → prepared manifest; returns its path."""
    from pipeline.data.images import read_idx
    from pipeline.stages.prepare import prepare
    from pipeline.config import PrepareConfig

    src = work / "fm"
    src.mkdir(parents=True, exist_ok=True)
    if (FM / "train-images-idx3-ubyte.gz").exists():
        x, y = read_idx(FM / "train-images-idx3-ubyte.gz"), read_idx(FM / "train-labels-idx1-ubyte.gz")
        xt, yt = read_idx(FM / "t10k-images-idx3-ubyte.gz"), read_idx(FM / "t10k-labels-idx1-ubyte.gz")
        reps = -(-n // len(x))
        x, y = np.concatenate([x] * reps)[:n], np.concatenate([y] * reps)[:n]
        xt, yt = xt[:100], yt[:100]
        what = "Fashion-MNIST"
    else:
        rng = np.random.default_rng(0)
        x, y = rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10
        xt, yt = rng.integers(0, 256, (100, 28, 28)), np.arange(100) % 10
        what = "random 28x28"
    write_idx(src / "train-images-idx3-ubyte.gz", x)
    write_idx(src / "train-labels-idx1-ubyte.gz", y)
    write_idx(src / "t10k-images-idx3-ubyte.gz", xt)
    write_idx(src / "t10k-labels-idx1-ubyte.gz", yt)
    prepare(work / "data", PrepareConfig(source="fashion-mnist", root=str(src), val_frac=0.0, test_frac=0.2, seed=0))
    print(f"data: {n} {what} training images → {work / 'data/manifest.csv'}")
    return work / "data" / "manifest.csv"


def run_score(manifest: Path, model: Path, out: Path, procs: int, subset: str, extra: list[str], cores: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // procs)), "PYTHONPATH": str(ROOT)}
    launch = [sys.executable, "-m", "cli.main"] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), "-m", "cli.main"]
    cmd = launch + ["score", str(manifest), "--model", str(model), "--out", str(out), "--subset", subset,
                    "--device", "cpu", "--params", str(out.parent / "absent.yaml"), *extra]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode:
        sys.exit(f"score with {procs} process(es) failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    meta = json.loads((out / "meta.json").read_text())
    passes = 1 + len(meta["self_influence"]["checkpoints"])
    return {"seconds": meta["seconds"], "wall": wall, "n": meta["n"], "passes": passes,
            "rate": meta["n"] * passes / meta["seconds"], "threads": max(1, cores // procs)}


def compare(a: Path, b: Path) -> str:
    import pandas as pd

    x, y = pd.read_csv(a / "scores.csv"), pd.read_csv(b / "scores.csv")
    if x["id"].tolist() != y["id"].tolist():
        return "DIFFERENT ids"
    cols = ["loss", "grad_norm", "el2n", "margin", "self_influence"]
    # relative to each column's scale (a relative error near 0, e.g. a margin of 1e-4, says little)
    rel = max(float(np.nanmax(np.abs(x[c] - y[c])) / max(float(np.nanmax(np.abs(x[c]))), 1e-30)) for c in cols)
    return f"same ids; max |diff| / column max {rel:.1e}"


def cpu_part(args, work: Path) -> None:
    from pipeline.stages.train import train
    from pipeline.training.recipe import Recipe

    cores = os.cpu_count() or 1
    manifest = make_data(work / "cpu", args.n)
    model = work / "cpu" / "model"
    t0 = time.perf_counter()
    train(manifest, model, Recipe(model="small_cnn", epochs=args.epochs, batch_size=128, device="cpu", track=0))
    print(f"trained small_cnn for {args.epochs} epoch(s) in {time.perf_counter() - t0:.1f} s\n")
    rows, base = [], None
    runs = [(p, []) for p in args.procs]
    if args.stream:
        runs.append((1, ["--cache-max-gb", "0", "--workers", "2"]))
    for procs, extra in runs:
        out = work / "cpu" / f"scores_{procs}{'_stream' if extra else ''}"
        r = run_score(manifest, model, out, procs, args.subset, extra, cores)
        if procs == 1 and not extra:
            base = (r, out)
        check = compare(base[1], out) if base and out != base[1] else ""
        rows.append((f"{procs}{' (streamed)' if extra else ''}", r, check))
    print(f"clean score on CPU ({cores} cores, {rows[0][1]['n']} images × {rows[0][1]['passes']} passes, "
          f"subset {args.subset}, small_cnn)")
    print(f"{'processes':<14}{'threads/proc':>13}{'score s':>10}{'images/s':>11}{'speed-up':>10}{'wall s':>9}  check")
    for name, r, check in rows:
        sp = r["rate"] / base[0]["rate"] if base else float("nan")
        print(f"{name:<14}{r['threads']:>13}{r['seconds']:>10.2f}{r['rate']:>11.0f}{sp:>9.2f}x{r['wall']:>9.1f}  {check}")


def gpu_part(args, work: Path) -> None:
    import torch

    from pipeline.stages.score import score
    from pipeline.config import ScoreConfig
    from pipeline.stages.train import train
    from pipeline.training.recipe import Recipe

    if not torch.cuda.is_available():
        print("\nGPU: none visible (torch.cuda.is_available() is False); skipped")
        return
    name = torch.cuda.get_device_name(0)
    manifest = make_data(work / "gpu", args.gpu_n)
    m = train(manifest, work / "gpu" / "model", Recipe(model=args.gpu_model, epochs=args.gpu_epochs, batch_size=256,
                                                      device="cuda", amp="auto"))
    s0 = time.perf_counter()
    df = score(work / "gpu" / "model", manifest, work / "gpu" / "scores",
               ScoreConfig(subset=args.subset, batch_size=512, device="cuda"))
    secs = time.perf_counter() - s0
    meta = json.loads((work / "gpu" / "scores" / "meta.json").read_text())
    passes = 1 + len(meta["self_influence"]["checkpoints"])
    print(f"\nGPU: {name} (torch {torch.__version__}, bf16 {torch.cuda.is_bf16_supported()})")
    print(f"  train {args.gpu_model}: {m['n_train']} images × {args.gpu_epochs} epochs, {m['seconds']:.1f} s, "
          f"{m['samples_per_s']:.0f} images/s (amp auto, channels_last)")
    print(f"  score ({args.subset}): {len(df)} images × {passes} passes, {secs:.1f} s, "
          f"{len(df) * passes / secs:.0f} images/s (float32)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="training images for the CPU comparison")
    ap.add_argument("--procs", default="1,2", help="process counts to compare, e.g. 1,2")
    ap.add_argument("--subset", default="all", help="score.params: last | weights | biases | all")
    ap.add_argument("--epochs", type=int, default=1, help="training epochs (= self-influence checkpoints)")
    ap.add_argument("--stream", action="store_true", help="also score 1 process with streamed decode")
    ap.add_argument("--gpu-n", type=int, default=60000)
    ap.add_argument("--gpu-epochs", type=int, default=2)
    ap.add_argument("--gpu-model", default="small_cnn")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU comparison")
    ap.add_argument("--keep", type=Path, help="work folder to keep (default: a temp folder, removed)")
    args = ap.parse_args()
    args.procs = [int(p) for p in args.procs.split(",")]
    work = args.keep or Path(tempfile.mkdtemp(prefix="clean-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not args.no_cpu:
            cpu_part(args, work)
        gpu_part(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
