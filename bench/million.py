"""A 1,000,000-row manifest through train, score (`last`), flag (label + duplicates + outliers) and prune,
with wall time and peak RSS per stage (issue 14's scale check).

The images are synthetic 8×8 grayscale (a bright band per class, plus noise, 1 % exact copies and 1 %
flipped labels), stored in one IDX file that the manifest references as `imgs.idx#<i>` — the way
`clean prepare` writes Fashion-MNIST — so no million files are written. Each stage runs as its own
`clean` process (`/usr/bin/time -v` gives its peak RSS):

    python bench/million.py --n 1000000 --work /tmp/million
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def make(work: Path, n: int, classes: int = 4, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.integers(0, 60, size=(n, 8, 8), dtype=np.uint8)
    rows = np.arange(8)[None, :] // (8 // classes) == y[:, None]
    x[rows] = rng.integers(180, 256, size=int(rows.sum()) * 8, dtype=np.uint8).reshape(-1, 8)
    dup = rng.choice(n, size=n // 100, replace=False)
    x[dup] = x[rng.choice(n, size=dup.size)]
    flip = rng.choice(n, size=n // 100, replace=False)
    y_given = y.copy()
    y_given[flip] = (y[flip] + 1) % classes
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    with open(data / "imgs.idx", "wb") as f:  # IDX: magic 0x0803, dims n, 8, 8 (big-endian), then the bytes
        f.write(bytes([0, 0, 8, 3]) + np.array([n, 8, 8], ">u4").tobytes())
        f.write(x.tobytes())
    split = np.where(rng.random(n) < 0.9, "train", np.where(rng.random(n) < 0.5, "val", "test"))
    import pandas as pd

    pd.DataFrame({"id": np.arange(n), "path": [f"imgs.idx#{i}" for i in range(n)], "label": y_given,
                  "split": split}).to_csv(data / "manifest.csv", index=False)
    (data / "classes.json").write_text(json.dumps({"classes": [f"c{k}" for k in range(classes)], "in_chans": 1}))
    (work / "params.yaml").write_text(
        "train: {epochs: 1, batch_size: 256, device: cpu, seeds: [0], checkpoint_every: 1, track: 0}\n"
        "score: {params: last, self_influence: false, val_influence: false, batch_size: 2048}\n"
        "flag: {issues: [label, duplicate, outlier], grid: 0}\n")


def run(work: Path, *args: str) -> dict:
    t = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", "clean", *args], cwd=work, capture_output=True, text=True)
    secs = time.perf_counter() - t
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    if r.returncode != 0:
        print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"clean {' '.join(args)} failed ({r.returncode})")
    return {"stage": args[0], "seconds": round(secs, 1), "peak_rss_gib": round(int(rss.group(1)) / 2**20, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/million"))
    a = ap.parse_args()
    t = time.perf_counter()
    make(a.work, a.n)
    print(f"| make the manifest + IDX file | {time.perf_counter() - t:.1f} s | — |", flush=True)
    for args in (("train",), ("score",), ("flag",), ("prune",)):
        r = run(a.work, *args)
        print(f"| clean {r['stage']} | {r['seconds']} s | {r['peak_rss_gib']} GiB |", flush=True)


if __name__ == "__main__":
    main()
