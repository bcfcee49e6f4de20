"""Planted-problem benchmark for the duplicate, outlier and image-property issue types.

    python bench/planted.py --n 6000 --seed 1 --out /tmp/planted1            # generate, run the CLI, score
    python bench/planted.py --n 6000 --seed 1 --out /tmp/planted1c --colour  # colour variant (+ grayscale)
    python bench/planted.py --npz scores/embeddings.npz --scores scores/scores.csv   # time the detectors only
    python bench/planted.py --synthetic 1000000 --dim 128                    # duplicates + outliers at 1M

Generates an ImageFolder from Fashion-MNIST (pipeline.data.images.read_idx) with planted
problems whose truth it keeps (truth.csv): exact copies, near copies (JPEG re-encoding,
JPEG q50–90, 1–2 px shift, a crop of 80–95 % of the area resized back, horizontal flip,
±3–8° rotation, brightness/contrast ×0.7–1.3), label conflicts
(a copy under another class), copies of Fashion-MNIST *test* images (each planted as a pair;
the pairs that the seeded split puts on both sides of train / val+test are the leakage
truth), out-of-distribution images (sklearn digits upscaled, noise, rendered text) and
image defects (dark, light, blurry, blank / low-information, odd size, odd aspect ratio; in
the colour variant grayscale images among tinted ones). Then runs the real CLI (`clean
prepare --source imagefolder`, `clean train`, `clean score --subset last`), calls every
detector through the ISSUES registry on scores/embeddings.npz, and prints precision and
recall per problem type plus seconds per detector. Tune on one seed, report on another.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FMNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
#: how planted near copies differ from their original (bench/planted.py::_near)
NEAR_KINDS = ("jpeg", "shift", "crop", "flip", "rotate", "photometric")
ISSUE_NAMES = ["duplicate", "leakage", "outlier", "dark", "light", "blurry", "low_information", "odd_size", "odd_aspect_ratio",
               "grayscale"]


# --------------------------------------------------------------------------- generation
def _load_fmnist():
    from pipeline.data.images import read_idx

    xtr = read_idx(FMNIST / "train-images-idx3-ubyte.gz")
    ytr = read_idx(FMNIST / "train-labels-idx1-ubyte.gz")
    xte = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")
    yte = read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")
    return xtr, ytr.astype(int), xte, yte.astype(int)


def _tint(img: np.ndarray, rng) -> np.ndarray:
    """A colour version of a gray image: each pixel × a random saturated colour (+ a faint tinted background)."""
    c = rng.uniform(0.15, 1.0, 3)
    c[rng.integers(3)] = 1.0
    bg = rng.uniform(0.0, 0.12) * rng.uniform(0.2, 1.0, 3)
    x = img[..., None].astype(np.float32) / 255.0
    return np.clip(255 * (x * c + (1 - x) * bg), 0, 255).astype(np.uint8)


def _save(path: Path, arr: np.ndarray, fmt: str = "PNG", quality: int = 90) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    im.save(path, fmt, **({"quality": quality} if fmt == "JPEG" else {}))


def _near(img: np.ndarray, kind: str, rng) -> tuple[np.ndarray, str]:
    """A copy changed the way real duplicates differ → (array, file format)."""
    from PIL import Image, ImageEnhance

    im = Image.fromarray(img)
    if kind == "jpeg":
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=int(rng.integers(50, 90)))
        return np.asarray(Image.open(io.BytesIO(buf.getvalue()))), "PNG"
    if kind == "shift":
        dy, dx = rng.choice([-2, -1, 1, 2], 2)
        return np.asarray(im.transform(im.size, Image.AFFINE, (1, 0, dx, 0, 1, dy), fillcolor=0)), "PNG"
    if kind == "crop":  # a window of 80-95 % of the area anywhere in the image, resized back
        h, w = img.shape[:2]
        s = float(np.sqrt(rng.uniform(0.80, 0.95)))
        ch, cw = int(round(h * s)), int(round(w * s))
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        return np.asarray(im.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BILINEAR)), "PNG"
    if kind == "flip":
        return np.ascontiguousarray(img[:, ::-1]), "PNG"
    if kind == "rotate":
        ang = float(rng.choice([-1, 1]) * rng.uniform(3, 8))
        return np.asarray(im.rotate(ang, Image.BILINEAR, fillcolor=0)), "PNG"
    if kind == "photometric":
        im = ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.7, 1.3)))
        return np.asarray(ImageEnhance.Contrast(im).enhance(float(rng.uniform(0.7, 1.3)))), "PNG"
    raise ValueError(kind)


def _ood(kind: str, rng, digits) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    if kind == "digit":
        d = digits[int(rng.integers(len(digits)))]
        x = (d / 16.0 * 255).astype(np.uint8)
        x = np.asarray(Image.fromarray(x).resize((24, 24), Image.NEAREST))  # blocky, not blurry
        out = np.zeros((28, 28), np.uint8)
        out[2:26, 2:26] = x
        return out
    if kind == "noise":
        if rng.random() < 0.5:
            return rng.integers(0, 256, (28, 28)).astype(np.uint8)
        blobs = rng.normal(size=(7, 7))
        x = np.asarray(Image.fromarray(((blobs - blobs.min()) / np.ptp(blobs) * 255).astype(np.uint8)).resize((28, 28), Image.BICUBIC))
        return np.clip(x.astype(int) + rng.integers(-40, 40, (28, 28)), 0, 255).astype(np.uint8)
    if kind == "text":
        im = Image.new("L", (28, 28), 0)
        dr = ImageDraw.Draw(im)
        font = ImageFont.load_default()
        word = "".join(rng.choice(list("ABCDEFGHKLMNPRSTXYZ0123456789"), 3))
        dr.text((int(rng.integers(0, 6)), int(rng.integers(0, 8))), word, fill=int(rng.integers(180, 256)), font=font)
        dr.text((int(rng.integers(0, 6)), int(rng.integers(12, 18))), word[::-1], fill=int(rng.integers(180, 256)), font=font)
        return np.asarray(im)
    raise ValueError(kind)


def _defect(img: np.ndarray, kind: str, rng) -> np.ndarray:
    from PIL import Image, ImageFilter

    x = img.astype(np.float32)
    if kind == "dark":
        return (x * rng.uniform(0.12, 0.3)).astype(np.uint8)
    if kind == "light":
        return (255 - (255 - x) * rng.uniform(0.02, 0.04) if rng.random() < 0.5
                else 245 + x * rng.uniform(0.02, 0.04)).clip(0, 255).astype(np.uint8)
    if kind == "blurry":
        return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(float(rng.uniform(1.5, 2.5)))))
    if kind == "low_information":
        v = rng.integers(110, 230, img.shape[2:])  # one value (a colour in a colour set): neither dark nor light
        out = np.zeros(img.shape, np.int32) + v
        if rng.random() < 0.5:
            out += rng.integers(-2, 3, img.shape)
        return np.clip(out, 0, 255).astype(np.uint8)
    if kind == "odd_size":
        s = int(rng.choice([10, 12, 72, 96]))
        return np.asarray(Image.fromarray(img).resize((s, s), Image.BILINEAR))
    if kind == "odd_aspect_ratio":
        h, w = (28, int(rng.integers(70, 100))) if rng.random() < 0.5 else (int(rng.integers(70, 100)), 28)
        return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
    raise ValueError(kind)


def generate(out: Path, n: int, seed: int, colour: bool = False) -> Path:
    """ImageFolder at out/folder + out/truth.csv (file, type, subtype, set, partner)."""
    import pandas as pd
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    xtr, ytr, xte, yte = _load_fmnist()
    digits = load_digits().images
    folder = out / "folder"
    order = rng.permutation(len(xtr))
    base, pool = order[:n], iter(order[n:])  # pool: fresh images for copies' partners and defects
    truth = []
    serial = iter(range(10**9))

    def put(arr, y, typ="clean", sub="", set_id=-1, fmt="PNG", gray=False, also=""):
        name = f"{next(serial):07d}_{rng.integers(16**6):06x}.{'jpg' if fmt == 'JPEG' else 'png'}"
        rel = f"{CLASSES[y]}/{name}"
        a = arr
        if colour and not gray and a.ndim == 2:
            a = _tint(a, rng)
        _save(folder / rel, a, fmt)
        truth.append({"file": rel, "type": typ, "subtype": sub, "set": set_id, "label": y, "also": also})
        return rel

    for i in base:
        put(xtr[i], int(ytr[i]))
    n_sets = max(5, n // 100)  # each kind of planted problem: ~1 % of n (sets), defects ~0.3 %
    n_def = max(5, n // 300)
    sid = iter(range(10**6))
    # exact copies (1-2 extra copies) and near copies, of fresh images
    for _ in range(n_sets):
        i, s = next(pool), next(sid)
        arr = _tint(xtr[i], rng) if colour else xtr[i]  # the same array for every copy of the set
        for _c in range(1 + int(rng.random() < 0.3) + 1):
            put(arr, int(ytr[i]), "duplicate", "exact", s)
    kinds = list(NEAR_KINDS)
    for j in range(n_sets * 2):
        i, s = next(pool), next(sid)
        arr = _tint(xtr[i], rng) if colour else xtr[i]
        put(arr, int(ytr[i]), "duplicate", "original", s)
        k = kinds[j % len(kinds)]
        near, _ = _near(arr, k, rng)
        put(near, int(ytr[i]), "duplicate", k, s)
    # label conflicts: an exact or near copy under another class
    for j in range(n_sets // 2):
        i, s = next(pool), next(sid)
        arr = _tint(xtr[i], rng) if colour else xtr[i]
        y = int(ytr[i])
        put(arr, y, "duplicate", "conflict_original", s)
        other = int((y + rng.integers(1, 10)) % 10)
        copy = arr if j % 2 == 0 else _near(arr, kinds[(j // 2) % len(kinds)], rng)[0]
        put(copy, other, "duplicate", "conflict_copy", s)
    # copies of Fashion-MNIST test images, in pairs: the split decides which pairs leak
    te = rng.permutation(len(xte))
    for j in range(n_sets * 2):
        i, s = int(te[j]), next(sid)
        arr = _tint(xte[i], rng) if colour else xte[i]
        put(arr, int(yte[i]), "duplicate", "testcopy", s)
        put(arr if j % 2 == 0 else _near(arr, kinds[(j // 2) % len(kinds)], rng)[0], int(yte[i]), "duplicate", "testcopy", s)
    # out-of-distribution images under random classes
    for j in range(n_sets):
        k = ["digit", "digit", "noise", "text"][j % 4]
        put(_ood(k, rng, digits), int(rng.integers(10)), "outlier", k)
    # image defects of fresh images
    for k in ["dark", "light", "blurry", "low_information", "odd_size", "odd_aspect_ratio"]:
        for _ in range(n_def):
            i = next(pool)
            while np.percentile(xtr[i], 99) < 0.5 * 255:  # sources that have no other defect (not dark already)
                i = next(pool)
            arr = _defect(_tint(xtr[i], rng) if colour else xtr[i], k, rng)
            # an image smaller than the set is upscaled by the loader: blurry as the model sees it
            also = "blurry" if k == "odd_size" and arr.shape[0] < 28 else ""
            put(arr, int(ytr[i]), k, k, also=also)
    if colour:
        for _ in range(n_def):
            i = next(pool)
            put(xtr[i], int(ytr[i]), "grayscale", "grayscale", gray=True)
    pd.DataFrame(truth).to_csv(out / "truth.csv", index=False)
    return folder


# --------------------------------------------------------------------------- running
def run_cli(work: Path, folder: Path, epochs: int, seeds: list[int] = (0, 1, 2)) -> None:
    env = {**os.environ}
    steps = [
        ["clean", "prepare", "--source", "imagefolder", "--root", str(folder), "--out", "data"],
        ["clean", "train", "--manifest", "data/manifest.csv", "--out", "models/base", "--epochs", str(epochs),
         *[a for s in seeds for a in ("--seed", str(s))], "--device", "cpu"],
        ["clean", "score", "data/manifest.csv", "--model", "models/base", "--out", "scores", "--subset", "last",
         "--no-self-influence"],
    ]
    for cmd in steps:
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        print(f"  {cmd[1]:8s} {time.perf_counter() - t0:7.1f} s", flush=True)


def detect(scores_csv: Path, cfg: dict | None = None, first_model: bool = False) -> tuple[dict, dict, dict]:
    """Every issue type through the ISSUES registry → ({name: IssueResult}, {name: seconds}, features).
    first_model: the scored model's embeddings only (the other seeds' emb_1, … left out: the outlier rule before
    it averaged the seed models)."""
    import pandas as pd

    import dataclasses

    from pipeline.config import FlagConfig
    from pipeline.device import resolve_device
    from pipeline.registry import ISSUES
    from pipeline.rules import knn
    from pipeline.rules.base import RuleInputs

    c = dataclasses.replace(FlagConfig(), **(cfg or {}))
    df = pd.read_csv(scores_csv, usecols=["id", "label"])
    secs, res = {}, {}
    # `clean flag` resolves its device (importing torch, ~1.6 s here) before any detector runs; so here too,
    # timed apart, so that the first detector that samples with torch is not charged for the import
    t0 = time.perf_counter()
    inputs = RuleInputs(df, scores_csv, device=resolve_device(c.device))
    secs["torch import (as clean flag)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    feats = inputs.features()
    if first_model:
        feats["_later"] = {}
    secs["load embeddings.npz"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    knn.train_knn(feats, c.outlier_k, knn.EXACT_MAX, c.seed)
    secs["knn search (shared)"] = time.perf_counter() - t0
    for name in ISSUE_NAMES:
        t0 = time.perf_counter()
        res[name] = ISSUES[name].fn(inputs, c)
        secs[name] = time.perf_counter() - t0
    return res, secs, feats


def _pr(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float, int, int]:
    tp = int((pred & truth).sum())
    p = tp / max(int(pred.sum()), 1)
    r = tp / max(int(truth.sum()), 1)
    return p, r, int(truth.sum()), int(pred.sum())


def evaluate(work: Path, res: dict) -> list[dict]:
    import pandas as pd

    man = pd.read_csv(work / "data" / "manifest.csv")
    truth = pd.read_csv(work / "truth.csv")
    scores = pd.read_csv(work / "scores" / "scores.csv", usecols=["id"])
    # manifest paths → truth rows by the class/name tail
    man["file"] = man["path"].map(lambda p: "/".join(str(p).replace("\\", "/").split("/")[-2:]))
    m = man.merge(truth, on="file", how="left", validate="one_to_one")
    m["type"] = m["type"].fillna("clean")
    tr = m.set_index("id").loc[scores["id"].to_numpy()]
    # duplicate truth: training members of planted sets that have ≥ 2 members anywhere… with a training member
    set_split = m[m["set"] >= 0].groupby("set")["split"].agg(list)
    multi = set_split[set_split.map(len) >= 2]
    spans = multi[multi.map(lambda s: "train" in s and any(x != "train" for x in s))].index
    has_pair_in_train = multi[multi.map(lambda s: s.count("train") >= 2)].index
    setv = tr["set"].fillna(-1).to_numpy().astype(int)
    is_dup_truth = np.isin(setv, list(spans)) | np.isin(setv, list(has_pair_in_train))
    leak_truth = np.isin(setv, list(spans))
    conflict_sets = m[m["subtype"] == "conflict_copy"]["set"].unique()
    conf_truth = np.isin(setv, conflict_sets) & is_dup_truth
    # a conflict set whose two members split across train / val+test is a leak, not a conflict among training images:
    # it is still a conflict of the set (the eval copy carries the other label) — kept in the truth
    typ = tr["type"].to_numpy()
    also = tr["also"].fillna("").to_numpy() if "also" in tr.columns else np.full(len(tr), "")
    sub = tr["subtype"].fillna("").to_numpy()
    rows = []
    g = res["duplicate"].columns["duplicate_group"] >= 0
    p, r, nt, npred = _pr(g, is_dup_truth)
    rows.append({"type": "duplicate (in a set)", "precision": p, "recall": r, "n_true": nt, "n_flagged": npred})
    for s in ["exact", *NEAR_KINDS, "testcopy"]:
        t = is_dup_truth & ((sub == s) | ((sub == "original") & np.isin(setv, m[m["subtype"] == s]["set"].unique())))
        rows.append({"type": f"  duplicate: {s}", "precision": float("nan"), "recall": float((g & t).sum() / max(t.sum(), 1)),
                     "n_true": int(t.sum()), "n_flagged": int((g & t).sum())})
    # is_duplicate: expected = all training members but one per set
    exp_flag = 0
    for sset in np.unique(setv[is_dup_truth]):
        exp_flag += int((setv == sset).sum()) - 1
    fl = res["duplicate"].flagged
    rows.append({"type": "  is_duplicate (drop copies)", "precision": float((fl & is_dup_truth).sum() / max(fl.sum(), 1)),
                 "recall": float((fl & is_dup_truth).sum() / max(exp_flag, 1)), "n_true": exp_flag, "n_flagged": int(fl.sum())})
    p, r, nt, npred = _pr(res["duplicate"].columns["duplicate_conflict"], conf_truth)
    rows.append({"type": "label conflict (set)", "precision": p, "recall": r, "n_true": nt, "n_flagged": npred})
    p, r, nt, npred = _pr(res["duplicate"].columns["duplicate_leak"], leak_truth)
    rows.append({"type": "leakage (train copy)", "precision": p, "recall": r, "n_true": nt, "n_flagged": npred})
    lk = res["duplicate"].summary["leakage"]
    n_eval_truth = int(m[m["set"].isin(spans) & (m["split"] != "train")].shape[0])
    rows.append({"type": "  leakage: val/test images", "precision": float("nan"), "recall": lk["n_eval_images"] / max(n_eval_truth, 1),
                 "n_true": n_eval_truth, "n_flagged": lk["n_eval_images"]})
    planted_other = (typ != "clean") & (typ != "outlier")
    for name in ISSUE_NAMES[2:]:
        if name == "grayscale" and not (typ == "grayscale").any() and not res[name].flagged.any():
            continue
        t = (typ == name) | (also == name)
        f = res[name].flagged
        p, r, nt, npred = _pr(f, t)
        row = {"type": name, "precision": p, "recall": r, "n_true": nt, "n_flagged": npred}
        if name == "outlier":
            row["precision_vs_clean"] = float((f & t).sum() / max((f & ~planted_other).sum(), 1))
            hits = np.cumsum(t[np.argsort(-np.nan_to_num(res[name].score, nan=-np.inf), kind="stable")])
            at = int(np.searchsorted(hits, int(np.ceil(0.9 * t.sum()))))  # the first rank that reaches recall 0.9
            row["precision_at_recall_0.9"] = float(hits[at] / (at + 1)) if t.any() and at < len(hits) else float("nan")
            row["flags_on_other_planted"] = int((f & planted_other).sum())
            for k in ["digit", "noise", "text"]:
                tk = t & (sub == k)
                rows.append({"type": f"  outlier: {k}", "precision": float("nan"), "recall": float((f & tk).sum() / max(tk.sum(), 1)),
                             "n_true": int(tk.sum()), "n_flagged": int((f & tk).sum())})
        rows.insert(len(rows) - (3 if name == "outlier" else 0), row)
    return rows


def print_table(rows: list[dict], secs: dict) -> None:
    print(f"\n{'problem type':30s} {'precision':>9s} {'recall':>7s} {'truth':>6s} {'flagged':>8s}")
    for r in rows:
        extra = ""
        if "precision_vs_clean" in r:
            extra = (f"   (precision vs clean images {r['precision_vs_clean']:.3f}; {r['flags_on_other_planted']} flags on "
                     f"other planted problems; precision at recall 0.9 by score {r['precision_at_recall_0.9']:.3f})")
        pr = "" if r["precision"] != r["precision"] else f"{r['precision']:.3f}"
        print(f"{r['type']:30s} {pr:>9s} {r['recall']:7.3f} {r['n_true']:6d} {r['n_flagged']:8d}{extra}")
    print_secs(secs)


def print_secs(secs: dict) -> None:
    print(f"\n{'detector':28s} {'seconds':>8s}")
    for k, v in secs.items():
        print(f"{k:28s} {v:8.3f}")
    # reading the file and importing torch are paid by `clean flag` whatever the detectors: not in the total
    tot = sum(v for k, v in secs.items() if k != "load embeddings.npz" and not k.startswith("torch import"))
    print(f"{'all detectors':28s} {tot:8.3f}   (peak RSS {peak_rss_gb():.2f} GiB)")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def synthetic(n: int, dim: int, seed: int, n_eval: int) -> dict:
    """n training + n_eval val/test 128-d embeddings in 1000 clusters, 0.1 % planted near copies, 0.1 % far points."""
    rng = np.random.default_rng(seed)
    m = n + n_eval
    centres = rng.normal(size=(1000, dim)).astype(np.float32)
    emb = np.empty((m, dim), np.float16)
    lab = rng.integers(0, 10, m)
    for s in range(0, m, 200_000):
        e = min(m, s + 200_000)
        emb[s:e] = centres[rng.integers(0, 1000, e - s)] + 0.6 * rng.normal(size=(e - s, dim)).astype(np.float32)
    k = n // 1000
    src = rng.choice(n, k, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(n), src), k, replace=False)
    emb[dst] = emb[src] + 0.002 * rng.normal(size=(k, dim))
    far = rng.choice(np.setdiff1d(np.arange(n), np.r_[src, dst]), k, replace=False)
    emb[far] = 3 * rng.normal(size=(k, dim))
    split = np.array(["train"] * n + ["test"] * n_eval, dtype="U5")
    return {"ids": np.arange(m, dtype=np.int64), "split": split, "label": lab, "emb": emb,
            "hash": rng.integers(0, 2**63, m, dtype=np.int64).astype(np.uint64),
            "train_pos": np.arange(n, dtype=np.int64), "_truth": (src, dst, far)}


def index_sweep(npz: Path, sizes=(10_000, 20_000, 40_000, 60_000), k: int = 10, nprobes=None) -> None:
    """Seconds of an exact flat search vs the IVF index (build + search, k+1 neighbours of every
    indexed vector) and the IVF's recall of the exact 10 nearest neighbours, at each IVF nprobe of
    `nprobes` (default: knn.NPROBE, the one the detectors use)."""
    from pipeline.rules import knn

    shipped = knn.NPROBE
    for nprobe in nprobes or [shipped]:
        knn.NPROBE = nprobe
        try:
            _index_sweep(npz, sizes, k)
        finally:
            knn.NPROBE = shipped


def _index_sweep(npz: Path, sizes, k: int) -> None:
    from pipeline.rules import knn

    with np.load(npz) as z:
        emb = knn.normalize(z["emb"])
    rng = np.random.default_rng(0)
    print(f"{'N':>8s} {'flat s':>8s} {'ivf s':>8s} {'ivf recall@10':>14s} {'nn1 recall':>10s}")
    for n in sizes:
        if n > len(emb):
            continue
        x = emb[np.sort(rng.choice(len(emb), n, replace=False))]
        t0 = time.perf_counter()
        idx, _ = knn.build_index(x, exact_max=n)
        d0, r0 = knn.search(idx, x, k + 1)
        t1 = time.perf_counter()
        idx, kind = knn.build_index(x, exact_max=0)
        d1, r1 = knn.search(idx, x, k + 1)
        t2 = time.perf_counter()
        rec = np.mean([len(np.intersect1d(a, b)) / (k + 1) for a, b in zip(r0, r1)])
        nn1 = np.mean(np.abs(d0[:, 1] - d1[:, 1]) < 1e-6)
        print(f"{n:8d} {t1 - t0:8.2f} {t2 - t1:8.2f} {rec:14.3f} {nn1:10.3f}   {kind}", flush=True)


def clean_properties() -> None:
    """Fraction of clean digits (1,797, 8 × 8) and clean Fashion-MNIST (70,000) flagged by any
    image-property check at the defaults (statistics computed as `clean score` does)."""
    from sklearn.datasets import load_digits

    from pipeline.config import FlagConfig
    from pipeline.rules import images as im
    from pipeline.scores.features import image_stats

    c = FlagConfig()
    xtr, _, xte, _ = _load_fmnist()
    sets = {"digits": np.rint(load_digits().images * 255 / 16).clip(0, 255).astype(np.uint8),
            "fashion-mnist": np.concatenate([xtr, xte])}
    checks = {"dark": lambda f: im.dark_issue(f, c.dark), "light": lambda f: im.light_issue(f, c.light),
              "blurry": lambda f: im.blurry_issue(f, c.blurry_mad, c.property_fpr),
              "low_information": lambda f: im.low_information_issue(f, c.low_information, c.dark, c.light),
              "odd_size": lambda f: im.odd_size_issue(f, c.odd_size),
              "odd_aspect_ratio": lambda f: im.odd_aspect_ratio_issue(f, c.odd_aspect_ratio),
              "grayscale": im.grayscale_issue}
    for name, x in sets.items():
        parts = [image_stats(x[s:s + 8192, None]) for s in range(0, len(x), 8192)]
        f = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        f.update(height=np.full(len(x), x.shape[1]), width=np.full(len(x), x.shape[2]), train_pos=np.arange(len(x)))
        flags = {k: fn(f).flagged for k, fn in checks.items()}
        anyf = np.any(list(flags.values()), axis=0)
        print(f"{name:14s} n={len(x):6d}  any property check: {int(anyf.sum())} ({anyf.mean():.3%})  "
              + ", ".join(f"{k} {int(v.sum())}" for k, v in flags.items()))


def _flag_overrides(items: list[str]) -> dict:
    """['copy_ratio=0.12', …] → {'copy_ratio': 0.12, …}, each value parsed as YAML (numbers, bools, strings)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--flag takes KEY=VALUE (a flag.* param), got {item!r}")
        out[key.strip().removeprefix("flag.")] = yaml.safe_load(value)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=6000, help="Fashion-MNIST images in the generated folder")
    ap.add_argument("--seed", type=int, default=1, help="generator seed (tune on one, report on another)")
    ap.add_argument("--out", type=Path, default=None, help="work folder (default /tmp/planted_<seed>)")
    ap.add_argument("--colour", action="store_true", help="tint every image; plant grayscale ones")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="training seeds (train.seeds; the outlier check averages the seed models' kNN distances)")
    ap.add_argument("--skip-run", action="store_true", help="reuse the work folder's scores (detectors only)")
    ap.add_argument("--flag", action="append", default=[], metavar="KEY=VALUE",
                    help="a flag.* param for the detectors (repeatable), e.g. --flag copy_ratio=0.12")
    ap.add_argument("--npz", type=Path, default=None, help="time the detectors on this embeddings.npz")
    ap.add_argument("--scores", type=Path, default=None, help="scores.csv beside --npz (its training ids)")
    ap.add_argument("--synthetic", type=int, default=0, help="duplicates + outliers on N synthetic embeddings")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--index-sweep", action="store_true",
                    help="with --npz: flat vs IVF seconds and IVF recall@10 on subsets (sets knn.EXACT_MAX)")
    ap.add_argument("--nprobe", type=int, nargs="*", default=None,
                    help="with --index-sweep: the IVF nprobe values to sweep (default: knn.NPROBE)")
    ap.add_argument("--json", type=Path, default=None, help="write the table and timings here")
    ap.add_argument("--first-model", action="store_true",
                    help="detectors on the scored model's embeddings only (not the other seeds': the outlier rule "
                         "before it averaged the seed models)")
    ap.add_argument("--clean-properties", action="store_true",
                    help="fraction of clean digits and clean Fashion-MNIST flagged by any image-property check")
    a = ap.parse_args(argv)
    if a.clean_properties:
        clean_properties()
        return

    if a.synthetic:
        from pipeline.rules import knn
        from pipeline.rules.duplicates import find_duplicates
        from pipeline.rules.outliers import knn_outliers

        feats = synthetic(a.synthetic, a.dim, a.seed, a.synthetic // 10)
        src, dst, far = feats.pop("_truth")
        print(f"synthetic: {a.synthetic} train + {a.synthetic // 10} test embeddings, {a.dim}-d; "
              f"RSS after generation {peak_rss_gb():.2f} GiB", flush=True)
        secs = {}
        t0 = time.perf_counter()
        nn = knn.train_knn(feats, 10)
        secs[f"knn search ({nn['kind']})"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        tp = feats["train_pos"]
        dup = find_duplicates(feats, feats["label"][tp], feats["ids"][tp])
        secs["duplicate"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = knn_outliers(feats)
        secs["outlier"] = time.perf_counter() - t0
        g = dup.columns["duplicate_group"]
        found = np.mean((g[src] >= 0) & (g[src] == g[dst]))
        print(f"planted near-copy pairs found: {found:.3f}; groups {dup.summary['n_groups']}; "
              f"outliers: recall {out.flagged[far].mean():.3f}, flagged {out.flagged.sum()} for {len(far)} planted")
        print_secs(secs)
        return
    if a.npz is not None and a.index_sweep:
        index_sweep(a.npz, nprobes=a.nprobe)
        return
    overrides = _flag_overrides(a.flag)  # before any work: a bad --flag ends at once
    if a.npz is not None:
        import shutil
        import tempfile

        scores = a.scores or a.npz.parent / "scores.csv"
        if a.npz.parent != scores.parent:
            tmp = Path(tempfile.mkdtemp())
            shutil.copy(a.npz, tmp / "embeddings.npz")
            shutil.copy(scores, tmp / "scores.csv")
            scores = tmp / "scores.csv"
        res, secs, feats = detect(scores, overrides)
        print(f"{len(res['duplicate'].flagged)} training images, {len(feats['ids'])} in embeddings.npz, "
              f"emb {feats['emb'].shape}")
        for name in ISSUE_NAMES:
            print(f"  {name:18s} {int(res[name].flagged.sum()):6d} flagged   {res[name].rule}")
        print_secs(secs)
        return
    work = a.out or Path(f"/tmp/planted_{a.seed}{'c' if a.colour else ''}")
    work.mkdir(parents=True, exist_ok=True)
    if not a.skip_run:
        t0 = time.perf_counter()
        folder = generate(work, a.n, a.seed, a.colour)
        print(f"generated {folder} in {time.perf_counter() - t0:.1f} s", flush=True)
        run_cli(work, folder, a.epochs, a.seeds)
    res, secs, _ = detect(work / "scores" / "scores.csv", overrides, first_model=a.first_model)
    rows = evaluate(work, res)
    s = res["duplicate"].summary
    print(f"\nseed {a.seed}, n {a.n}{', colour' if a.colour else ''}: duplicate sets {s['n_groups']} "
          f"({s['n_exact_groups']} exact, {s['n_near_groups']} near; {s['near_rule']}), conflicts {s['conflicts']['n_groups']}, "
          f"leaking sets {s['leakage']['n_groups']}; outlier rule: {res['outlier'].rule}")
    print_table(rows, secs)
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "seconds": secs}, indent=1))


if __name__ == "__main__":
    main()
