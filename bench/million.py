"""A 1,000,000-row manifest through train, score (`last`), flag (label + duplicates + outliers) and prune,
with wall time and peak RSS per stage (issue 14's scale check).

The images are synthetic 8×8 grayscale (a bright band per class, plus noise, 1 % exact copies and 1 %
flipped labels). By default they are stored in one IDX file that the manifest references as
`imgs.idx#<i>` — the way `clean prepare` writes Fashion-MNIST — so no million files are written.
With `--files` every image is its own PNG in an ImageFolder with official splits
(`photos/{train,test}/c<k>/<block>/<i>.png`, 95 % / 5 %; val carved by prepare) and `clean prepare`
itself checks them (each file opened and decoded once) before the other stages. Each stage runs as
its own `clean` process (`/usr/bin/time -v` gives its peak RSS):

    python bench/million.py --n 1000000 --work /tmp/million
    python bench/million.py --n 1000000 --work /tmp/million-files --files
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


def images(n: int, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
    """(uint8 images [n, 8, 8], given labels [n] with 1 % flipped, the generator) — 1 % exact copies."""
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
    return x, y_given, rng


PARAMS = ("train: {epochs: 1, batch_size: 256, device: cpu, seeds: [0], checkpoint_every: 1, track: 0}\n"
          "score: {params: last, self_influence: false, val_influence: false, batch_size: 2048}\n"
          "flag: {issues: [label, duplicate, outlier], grid: 0}\n")


def make(work: Path, n: int, classes: int = 4, seed: int = 0) -> None:
    """The IDX-backed manifest: work/data/{imgs.idx, manifest.csv, classes.json}, work/params.yaml."""
    x, y_given, rng = images(n, classes, seed)
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
    (work / "params.yaml").write_text(PARAMS)


def _write_pngs(job: tuple[str, np.ndarray, list[str]]) -> int:
    from PIL import Image

    _, x, names = job
    for img, name in zip(x, names):
        Image.fromarray(img).save(name, format="PNG")
    return len(names)


def make_files(work: Path, n: int, classes: int = 4, seed: int = 0, block: int = 10_000) -> None:
    """One PNG per image: work/photos/{train,test}/c<k>/<i // block>/<i>.png, and work/params.yaml."""
    from concurrent.futures import ProcessPoolExecutor

    x, y_given, rng = images(n, classes, seed)
    split = np.where(rng.random(n) < 0.95, "train", "test")
    names = [str(work / "photos" / s / f"c{k}" / f"{i // block:03d}" / f"{i}.png")
             for i, (s, k) in enumerate(zip(split.tolist(), y_given.tolist()))]
    for d in sorted({str(Path(p).parent) for p in names}):
        Path(d).mkdir(parents=True, exist_ok=True)
    chunks = [("", x[i:i + 20_000], names[i:i + 20_000]) for i in range(0, n, 20_000)]
    with ProcessPoolExecutor() as ex:
        done = sum(ex.map(_write_pngs, chunks))
    assert done == n
    (work / "params.yaml").write_text("data: {source: imagefolder, root: photos}\n" + PARAMS)


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
    ap.add_argument("--files", action="store_true", help="one PNG file per image, checked by `clean prepare`")
    ap.add_argument("--stages", nargs="+", default=None, help="the stages to run (default: all)")
    a = ap.parse_args()
    t = time.perf_counter()
    stages = ["train", "score", "flag", "prune"]
    if a.files:
        if not (a.work / "photos").is_dir():
            make_files(a.work, a.n)
        print(f"| write {a.n:,} PNG files | {time.perf_counter() - t:.1f} s | — |", flush=True)
        stages.insert(0, "prepare")
    else:
        make(a.work, a.n)
        print(f"| make the manifest + IDX file | {time.perf_counter() - t:.1f} s | — |", flush=True)
    for args in [(s,) for s in (a.stages or stages)]:
        r = run(a.work, *args)
        print(f"| clean {r['stage']} | {r['seconds']} s | {r['peak_rss_gib']} GiB |", flush=True)


if __name__ == "__main__":
    main()
