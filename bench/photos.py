"""Photos at 224 px through the real CLI: s/epoch of resnet18, scoring time (`last`, `all`) and
the ratio of `all`-parameter scoring to a training step.

Usage:  OMP_NUM_THREADS=2 python bench/photos.py [--n 2000] [--epochs 1] [--work /tmp/clean_photos]
                                                [--device cpu] [--batch-size 32] [--model resnet18]
        python bench/photos.py --repro [--seeds 0 1] [--epochs 1]     # the whole pipeline: `dvc repro`

Data: the first --n Fashion-MNIST training images (/usr/share/datasets/fashion-mnist, read with
pipeline.data.images.read_idx), upscaled 28 → 224 (bicubic) and coloured (each class its hue,
each image a random tint and background), saved as RGB JPEGs (quality 90) in an ImageFolder with
the user's own splits: WORK/photos/train/<class>/ (80 %) and WORK/photos/test/<class>/ (20 %).
Made once; a rerun reuses it.

Then in WORK, with a params.yaml (imagefolder, data.image_size 224, model resnet18 with
pretrained: false, --epochs, train.augment auto → on for these photos, one seed):
  clean prepare; clean train; clean score (score.params last); clean score (score.params all)
each timed by wall clock (a fresh process: imports, model load and image decoding included),
plus the stage's own figures (models/base/metrics.json `seconds`, scores/meta.json `seconds`).
Self-influence and embeddings are off in both scorings; score.val_influence keeps its default
(on: train→validation TracIn over the one checkpoint, with the same score.params), so the two
scorings differ only in score.params. The ratio divides `all` scoring's seconds per image by training's seconds per
image (one epoch = every image once, forward + backward + update, batch --batch-size).

With --repro: `git clone` of this checkout's HEAD into WORK/repo, its params.yaml changed only in
data (imagefolder at WORK/photos, image_size 224), model.name, train.epochs / batch_size / seeds
and score.batch_size, then `time dvc repro` — the default pipeline (train every seed, evaluate,
score `all` with self- and val-influence and embeddings, flag every issue type, prune, retrain,
evaluate, report) — and the per-stage figures from the files the stages write.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FASHION = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def make_photos(root: Path, n: int, seed: int = 0) -> None:
    """root/{train,test}/<class>/<i>.jpg: n coloured 224x224 RGB JPEGs from Fashion-MNIST."""
    from PIL import Image

    from pipeline.data.images import read_idx

    def idx(stem):
        for name in (stem, stem + ".gz"):
            if (FASHION / name).is_file():
                return read_idx(FASHION / name)
        sys.exit(f"Fashion-MNIST not found in {FASHION}: apt-get install -y dataset-fashion-mnist")

    if (root / ".done").is_file() and (root / ".done").read_text() == str(n):
        return
    imgs, labels = idx("train-images-idx3-ubyte")[:n], idx("train-labels-idx1-ubyte")[:n]
    rng = np.random.default_rng(seed)
    hues = np.array([[1.0, 0.3, 0.3], [0.3, 1.0, 0.3], [0.3, 0.3, 1.0], [1.0, 1.0, 0.3], [1.0, 0.3, 1.0],
                     [0.3, 1.0, 1.0], [1.0, 0.6, 0.2], [0.6, 0.2, 1.0], [0.2, 0.6, 0.4], [0.8, 0.8, 0.8]])
    test = np.zeros(n, bool)
    test[rng.permutation(n)[: n // 5]] = True
    for i, (img, y) in enumerate(zip(imgs, labels)):
        big = np.asarray(Image.fromarray(img).resize((224, 224), Image.BICUBIC), np.float32) / 255.0
        tint = np.clip(hues[y] * rng.uniform(0.7, 1.0, 3), 0, 1)
        bg = rng.uniform(0.0, 0.35, 3)
        rgb = big[..., None] * tint + (1 - big[..., None]) * bg
        rgb = np.clip(rgb * 255 + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)
        path = root / ("test" if test[i] else "train") / CLASSES[y] / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(path, "JPEG", quality=90)
    (root / ".done").write_text(str(n))


def clean(work: Path, *args: str) -> float:
    """Run `clean ARGS` in `work` (this checkout's CLI); → wall seconds. Exits on failure."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=work, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    if res.returncode:
        sys.exit(f"clean {' '.join(args)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def repro(work: Path, a) -> None:
    """The default pipeline on the photo folder: `dvc repro` in a fresh clone (see the module doc)."""
    import yaml

    repo, marker = work / "repo", ".bench-photos-repro"
    if repo.exists():
        if not (repo / marker).is_file():  # only a clone this script made is ever removed
            sys.exit(f"{repo} exists and was not made by bench/photos.py --repro; move it or give another --work")
        subprocess.run(["rm", "-rf", str(repo)], check=True)
    subprocess.run(["git", "clone", "-q", str(Path(__file__).resolve().parents[1]), str(repo)], check=True)
    (repo / marker).write_text("made by bench/photos.py --repro; removed by its next run\n")
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["data"].update(source="imagefolder", root=str(work / "photos"), image_size=224)
    p["model"]["name"] = a.model
    p["train"].update(epochs=a.epochs, batch_size=a.batch_size, seeds=a.seeds, device=a.device)
    p["score"]["batch_size"] = 2 * a.batch_size
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    t0 = time.perf_counter()
    res = subprocess.run(["dvc", "repro"], cwd=repo, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (work / "repro.log").write_text(res.stdout + res.stderr)
    if res.returncode:
        sys.exit(f"dvc repro failed ({res.returncode}); log: {work / 'repro.log'}\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    read = lambda f: json.loads((repo / f).read_text())  # noqa: E731
    counts, base, pruned = read("data/classes.json")["counts"], read("models/base/metrics.json"), read("models/pruned/metrics.json")
    meta = read("scores/meta.json")
    n_train = counts["train"]
    per_epoch = [r["seconds"] / a.epochs for r in base["runs"]]
    per_image_train = float(np.mean(per_epoch)) / n_train
    n_ck = len(meta["self_influence"]["checkpoints"])
    print(f"dvc repro: {wall:.0f} s wall; splits {counts}; model {a.model}, {a.epochs} epoch(s), seeds {a.seeds}, "
          f"batch {a.batch_size}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"train: {np.mean(per_epoch):.1f} s/epoch (seeds: {', '.join(f'{s:.1f}' for s in per_epoch)}), "
          f"{1 / per_image_train:.1f} images/s")
    print(f"score (`{meta['params']}`, self- + val-influence over {n_ck} checkpoint(s), embeddings): "
          f"{meta['seconds']:.1f} s = {meta['seconds'] / n_train / per_image_train:.2f} training steps per image "
          f"(forward family + {n_ck} self-influence + {n_ck} val-influence passes + the other splits' embeddings)")
    retrain = [r["seconds"] for r in pruned["runs"]]
    print(f"retrain on {pruned['n_train']} images: {np.mean(retrain) / a.epochs:.1f} s/epoch")
    for name in ("base", "pruned"):
        m = read(f"metrics/{name}.json")
        print(f"metrics/{name}.json: " + ", ".join(f"{k}={v}" for k, v in m.items()))
    print(subprocess.run(["dvc", "metrics", "show"], cwd=repo, capture_output=True, text=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=Path("/tmp/clean_photos"))
    ap.add_argument("--repro", action="store_true", help="run the whole default pipeline with `dvc repro`")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="--repro: train.seeds")
    a = ap.parse_args()
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    make_photos(work / "photos", a.n)
    print(f"photos: {a.n} RGB 224x224 JPEGs in {work / 'photos'} ({time.perf_counter() - t0:.1f} s to make or check)")
    if a.repro:
        return repro(work, a)
    (work / "params.yaml").write_text(
        "data: {source: imagefolder, root: photos, image_size: 224, val_frac: 0.1}\n"
        f"model: {{name: {a.model}, pretrained: false}}\n"
        f"train: {{epochs: {a.epochs}, batch_size: {a.batch_size}, seeds: [0], device: {a.device}, "
        "augment: auto, workers: 0}\n"
        "score: {self_influence: false, embeddings: false, batch_size: 64}\n")
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"model {a.model}, {a.epochs} epoch(s), batch {a.batch_size}, device {a.device}, OMP_NUM_THREADS={threads}")
    wall = {"prepare": clean(work, "prepare")}
    counts = json.loads((work / "data/classes.json").read_text())["counts"]
    wall["train"] = clean(work, "train")
    m = json.loads((work / "models/base/metrics.json").read_text())
    fit_s = float(m["seconds"])
    n_train = counts["train"]
    score = {}
    for subset in ("last", "all"):
        wall[f"score {subset}"] = clean(work, "score", "data/manifest.csv", "--subset", subset,
                                        "--out", f"scores_{subset}")
        score[subset] = float(json.loads((work / f"scores_{subset}/meta.json").read_text())["seconds"])
    per_train = fit_s / (a.epochs * n_train)
    steps = a.epochs * -(-n_train // a.batch_size)
    print(f"splits: {counts}  (train/ and test/ kept, val carved from train/)")
    print(f"{'step':<12}{'wall s':>9}{'stage s':>9}{'images/s':>10}")
    print(f"{'prepare':<12}{wall['prepare']:>9.1f}")
    print(f"{'train':<12}{wall['train']:>9.1f}{fit_s:>9.1f}{a.epochs * n_train / fit_s:>10.1f}"
          f"   {fit_s / a.epochs:.1f} s/epoch, {fit_s / steps:.2f} s/step (batch {a.batch_size})")
    for subset in ("last", "all"):
        print(f"{'score ' + subset:<12}{wall['score ' + subset]:>9.1f}{score[subset]:>9.1f}"
              f"{n_train / score[subset]:>10.1f}")
    print(f"score all / training, per image: {score['all'] / n_train / per_train:.2f}  "
          f"(score last: {score['last'] / n_train / per_train:.2f})")
    print(f"train accuracy after the last epoch: {m['train_accuracy']:.3f} (random init, {a.epochs} epoch(s))")


if __name__ == "__main__":
    main()
