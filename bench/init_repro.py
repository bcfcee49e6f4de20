"""`clean init` → first `dvc repro` on a user's image folder, time per stage.

Makes a fresh git repository with N 28 px PNGs (Fashion-MNIST training images, N / 10 per class,
written as data/raw/<class>/<i>.png), runs `clean init`, then every stage of the written
dvc.yaml one at a time (`dvc repro -s <stage>`, in pipeline order) with default params, and
prints the seconds of each. Single-threaded when run as below (OMP_NUM_THREADS=1).

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python bench/init_repro.py --n 2000 --work /tmp/init_bench
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

FASHION = Path("/usr/share/datasets/fashion-mnist")


def sh(*args, cwd) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b",
           "GIT_COMMITTER_EMAIL": "b@b", "DVC_NO_ANALYTICS": "1"}
    r = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(map(str, args))} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def make_folder(root: Path, n: int) -> None:
    from pipeline.data.images import read_idx
    from pipeline.data.sources import FASHION_CLASSES

    imgs = read_idx(next(FASHION.glob("train-images-idx3-ubyte*")))
    labels = read_idx(next(FASHION.glob("train-labels-idx1-ubyte*")))
    for c, name in enumerate(FASHION_CLASSES):
        d = root / name.replace("/", "-")
        d.mkdir(parents=True, exist_ok=True)
        for j, i in enumerate(np.flatnonzero(labels == c)[: n // 10]):
            Image.fromarray(np.asarray(imgs[i])).save(d / f"{j:04d}.png")


def pipeline_order(stages: dict) -> list[str]:
    """Stage names with every stage after the stages whose outputs it depends on."""
    made = {}
    for name, st in stages.items():
        for key in ("outs", "metrics", "plots"):
            for o in st.get(key, []):
                made[next(iter(o)) if isinstance(o, dict) else o] = name
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        for d in stages[name].get("deps", []):
            up = next((made[o] for o in made if d == o or d.startswith(o.rstrip("/") + "/")), None)
            if up is not None and up != name:
                visit(up)
        order.append(name)

    for name in stages:
        visit(name)
    return order


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="images (n / 10 per class)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/init_bench"))
    a = ap.parse_args()
    repo = a.work / "repo"
    if (a.work / ".init_bench").exists():
        shutil.rmtree(a.work)
    elif a.work.exists():
        sys.exit(f"{a.work} exists and was not made by this script; give another --work")
    a.work.mkdir(parents=True)
    (a.work / ".init_bench").touch()
    repo.mkdir()
    sh("git", "init", "-q", cwd=repo)
    make_folder(repo / "data" / "raw", a.n)
    t = time.perf_counter()
    sh("clean", "init", cwd=repo)
    times = {"clean init (dvc init + dvc add)": time.perf_counter() - t}
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "clean init", cwd=repo)
    stages = pipeline_order(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])
    for st in stages:
        t = time.perf_counter()
        sh(sys.executable, "-m", "dvc", "repro", "-s", st, cwd=repo)
        times[st] = time.perf_counter() - t
    total = sum(times.values())
    print(f"{a.n} images (28 px PNG, {a.n // 10} per class), default params, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    for k, v in times.items():
        print(f"  {k:34s} {v:7.1f} s")
    print(f"  {'total':34s} {total:7.1f} s")
    base = yaml.safe_load((repo / "metrics" / "base.json").read_text())
    pruned = yaml.safe_load((repo / "metrics" / "pruned.json").read_text())
    print(f"  base accuracy {base['accuracy']:.4f} ± {base['accuracy_std']:.4f}; pruned {pruned['accuracy']:.4f} "
          f"({pruned.get('verdict')})")


if __name__ == "__main__":
    main()
