"""A user's noisy folder: does the cleaned version beat the original? (issue 20, docs/benchmarks.md)

Writes an ImageFolder of 28 px Fashion-MNIST images with official train/ and test/ folders,
shaped like a real annotator's folder — noise in EVERY split (train/ becomes train + val):

  * look-alike (pair) label noise at --rate between T-shirt/Shirt, Pullover/Coat and
    Sneaker/Ankle boot (--kind pairs; both directions), or symmetric noise (--kind symmetric),
    or none (--kind none: clean data),
  * --oos out-of-set images (sklearn's 8x8 digits upscaled to 28 px) filed under random classes,
  * --conflict copies of training images filed under another class,
  * --leak copies of test images in train/ (their given test label),

keeping the truth of every image (truth.csv). Then it runs clean's stages through the CLI
with params.yaml defaults (`clean prepare / train / score / flag / prune`, as `dvc repro`
does), and trains (`clean train`, every seed of train.seeds) each dataset version:

  base · default (`clean prune` with the defaults) · candidate remedies (--candidates) ·
  random removal of as many as the default changes · oracle (true labels; out-of-set images,
  conflicting copies and leaked copies dropped)

It reports precision / recall of the label issues per split against the planted flips, and per
version the test accuracy (mean ± sd over seeds) on the TRUE test labels and on the GIVEN
ones (and on the TRUE labels of the test images with no planted copy in train), the Welch
verdict against base (pipeline/verdict.py) and the share of the oracle gap.

    python bench/realistic.py --gen-seed 1 --kind pairs --work /tmp/real_p1 --json /tmp/real_p1.json
    python bench/realistic.py --gen-seed 1 --kind none  --work /tmp/real_c1 --candidates ""

Single-threaded: about 1 min per training of 10k images x 15 epochs on an idle core.
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
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.images import read_idx  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
#: look-alike classes: an annotator's mistakes go both ways
PAIRS = {0: 6, 6: 0, 2: 4, 4: 2, 7: 9, 9: 7}


def _flip(y: np.ndarray, rate: float, kind: str, rng) -> np.ndarray:
    """Given labels: round(rate x eligible) of `y` [N] changed (pairs: to the look-alike)."""
    given = y.copy()
    if kind == "none" or rate == 0:
        return given
    target = np.full(10, -1)
    for a, b in PAIRS.items():
        target[a] = b
    eligible = np.flatnonzero(target[y] >= 0) if kind == "pairs" else np.arange(len(y))
    pick = rng.choice(eligible, size=int(round(rate * len(eligible))), replace=False)
    given[pick] = target[y[pick]] if kind == "pairs" else (y[pick] + rng.integers(1, 10, len(pick))) % 10
    return given


def make_folder(root: Path, gen_seed: int, kind: str, rate: float, n_train: int, n_test: int,
                oos: float, conflict: float, leak: float, write: bool = True) -> pd.DataFrame:
    """Write root/{train,test}/<class>/<name>.png → truth frame (abspath, folder, true, given, kind, source:
    the frame row a conflicting or leaked copy copies, else -1); `write` False: the same frame, no files."""
    from PIL import Image
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(gen_seed)
    x = read_idx(FASHION / "train-images-idx3-ubyte.gz")
    y = read_idx(FASHION / "train-labels-idx1-ubyte.gz").astype(np.int64)
    xt = read_idx(FASHION / "t10k-images-idx3-ubyte.gz")
    yt = read_idx(FASHION / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    tr = np.sort(rng.choice(len(y), n_train, replace=False))
    te = np.sort(rng.choice(len(yt), n_test, replace=False))
    imgs, true = list(x[tr]), list(y[tr])
    given = list(_flip(y[tr], rate, kind, rng))
    kinds = ["flip" if g != t else "clean" for g, t in zip(given, true)]
    folder = ["train"] * n_train
    t_given = _flip(yt[te], rate, kind, rng)
    imgs += list(xt[te]); true += list(yt[te]); given += list(t_given)
    kinds += ["flip" if g != t else "clean" for g, t in zip(t_given, yt[te])]
    folder += ["test"] * n_test
    k = int(round(conflict * n_train))  # copies of training images under another class
    src = rng.choice(n_train, k, replace=False)
    imgs += [x[tr][i] for i in src]; true += list(y[tr][src])
    given += list((np.asarray(given[:n_train])[src] + rng.integers(1, 10, k)) % 10)
    kinds += ["conflict"] * k; folder += ["train"] * k
    source = [-1] * (n_train + n_test) + list(src)
    k = int(round(leak * n_train))  # test images copied into train/ with their given test label
    src = rng.choice(n_test, k, replace=False)
    imgs += [xt[te][i] for i in src]; true += list(yt[te][src]); given += list(t_given[src])
    kinds += ["leak"] * k; folder += ["train"] * k
    source += list(n_train + src)
    k = int(round(oos * n_train))  # out-of-set: digits, 8x8 -> 28 px
    d = load_digits().images
    pick = rng.choice(len(d), k, replace=False)
    for i in pick:
        imgs.append(np.asarray(Image.fromarray((d[i] * 255 / 16).astype(np.uint8)).resize((28, 28), Image.BILINEAR)))
    true += [-1] * k; given += list(rng.integers(0, 10, k)); kinds += ["oos"] * k; folder += ["train"] * k
    source += [-1] * k
    rows = []
    for i, (im, g) in enumerate(zip(imgs, given)):
        p = root / folder[i] / f"{g}-{CLASSES[g]}" / f"{i:06d}.png"  # sorted names = class index
        if write:
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(im, np.uint8)).save(p)
        rows.append(str(p.resolve()))
    return pd.DataFrame({"abspath": rows, "folder": folder, "true": true, "given": given, "kind": kinds,
                         "source": np.asarray(source, np.int64)})


def folder_truth(work: Path, gen_seed: int, kind: str, rate: float = 0.15, n_train: int = 11200, n_test: int = 2000,
                 oos: float = 0.01, conflict: float = 0.01, leak: float = 0.005) -> pd.DataFrame:
    """The truth frame of a finished run's work/folder (no file written); `kind` "none" plants nothing,
    as its runs' --oos 0 --conflict 0 --leak 0."""
    f = 0 if kind == "none" else 1
    return make_folder(work / "folder", gen_seed, kind, rate, n_train, n_test, oos * f, conflict * f, leak * f,
                       write=False)


def clean(work: Path, *args: str, log) -> None:
    """Run one `clean` command in `work` (params.yaml there), failing loudly."""
    t0 = time.perf_counter()
    r = subprocess.run(["clean", *args], cwd=work, capture_output=True, text=True)
    log(f"  $ clean {' '.join(args)}  ({time.perf_counter() - t0:.0f} s)")
    if r.returncode:
        raise SystemExit(f"clean {args[0]} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def joined(work: Path, truth: pd.DataFrame) -> pd.DataFrame:
    """manifest.csv joined with the truth by absolute path; `row` = the truth frame's row, `leaky` = a
    planted pair (conflicting or leaked copy and its source) split between train and val/test: the
    member in train is a leakage the detectors should find, the one in val/test is set aside."""
    man = pd.read_csv(work / "data/manifest.csv")
    man["abspath"] = [str((work / "data" / p).resolve()) for p in man["path"]]
    out = man.merge(truth.rename_axis("row").reset_index(), on="abspath", how="left", validate="one_to_one")
    assert out["kind"].notna().all() and (out["label"] == out["given"]).all()
    split = pd.Series(out["split"].to_numpy(), index=out["row"].to_numpy())
    src = out["source"].to_numpy()
    has = src >= 0
    other = np.where(has, split.reindex(np.where(has, src, 0)).to_numpy(), "")
    crosses = has & ((out["split"].to_numpy() == "train") != (other == "train"))  # this copy and its source apart
    rows = out["row"].to_numpy()
    leaky = crosses.copy()
    leaky |= np.isin(rows, src[crosses])  # ... and the source of such a copy
    out["leaky"] = leaky
    return out


def write_version(work: Path, man: pd.DataFrame, name: str, keep: np.ndarray, labels: np.ndarray) -> Path:
    """data/v_<name>.csv: the train rows kept with `labels`, val/test rows as given."""
    df = man[["id", "path", "label", "split"]].copy()
    df["label"] = labels
    df = df[keep | (df["split"] != "train")]
    p = work / "data" / f"v_{name}.csv"
    df.to_csv(p, index=False)
    return p


def accuracies(work: Path, model: str, man: pd.DataFrame) -> dict:
    """Test accuracy of every seed's run of models/<model> on the given and the true test labels."""
    from pipeline.stages.evaluate import evaluate_model, run_dirs

    test = man[man["split"] == "test"]
    tm = work / "data/manifest.csv"
    fl = pd.read_csv(work / "scores/flags.csv").set_index("id")
    unflagged = fl["is_label"].reindex(test["id"]).fillna(0).to_numpy() == 0  # flagged test images left out
    unleaked = ~test["leaky"].to_numpy()  # test images with no planted copy in train
    out = {"given": [], "true": [], "unflagged": [], "unleaked": []}
    for d in run_dirs(work / "models" / model):
        r = evaluate_model(d, tm, "test")
        assert np.array_equal(r["ids"], test["id"].to_numpy())
        out["given"].append(float((r["pred"] == test["given"].to_numpy()).mean()))
        out["unflagged"].append(float((r["pred"] == test["given"].to_numpy())[unflagged].mean()))
        out["unleaked"].append(float((r["pred"] == test["true"].to_numpy())[unleaked].mean()))
        ok = test["true"].to_numpy() >= 0
        out["true"].append(float((r["pred"][ok] == test["true"].to_numpy()[ok]).mean()))
    return out


def pr(flag: np.ndarray, truth: np.ndarray) -> dict:
    tp = int((flag & truth).sum())
    return {"n": int(flag.sum()), "n_true": int(truth.sum()), "precision": tp / max(int(flag.sum()), 1),
            "recall": tp / max(int(truth.sum()), 1)}


def candidates(work: Path, man: pd.DataFrame, flags: pd.DataFrame, wanted: list[str]) -> dict:
    """Candidate remedies → {name: (keep bool [N], labels int [N])} over the manifest rows."""
    from pipeline.rules.base import seed_mean_probs

    train = man["split"].to_numpy() == "train"
    ids = man["id"].to_numpy()
    f = flags.set_index("id").reindex(ids)
    emb = np.load(work / "scores/embeddings.npz")
    pos = pd.Series(np.arange(len(emb["ids"])), index=emb["ids"]).reindex(ids).to_numpy()
    y = man["label"].to_numpy()
    if "knn_label" in f:  # the label issue's own second view (flags.csv)
        vote = f["knn_label"].to_numpy()[train]
    else:
        from pipeline.rules.labels import knn_vote

        vote, _ = knn_vote(emb["emb"][pos].astype(np.float32)[train], y[train], 10)
    tr_ids = ids[train]
    p = seed_mean_probs(work / "models/base", tr_ids)
    sug, sp = p.argmax(1), p.max(1)
    is_label = f["is_label"].fillna(0).to_numpy(bool)[train]
    other = np.zeros(train.sum(), bool)  # out-of-set, conflicting and leaked copies (not plain copies)
    for col in ("is_outlier", "duplicate_conflict", "duplicate_leak"):
        if col in f:
            other |= f[col].fillna(0).to_numpy(bool)[train]
    agree = is_label & (vote == sug) & (sug != y[train])
    out = {}
    for name in wanted:
        keep_t, lab_t = ~other, y[train].copy()
        if name == "relabel-agree":
            sure = agree & (sp >= 0.5)
            lab_t[sure] = sug[sure]
        elif name == "relabel-agree-drop-rest":
            sure = agree & (sp >= 0.5)
            lab_t[sure] = sug[sure]
            keep_t &= ~(is_label & ~sure)
        elif name == "drop-other":  # the flagged out-of-set images, conflicting and leaked copies only (labels kept)
            pass
        elif name == "drop-issues":  # prune.drop [duplicate, leakage, outlier]: every flagged copy and out-of-set image
            keep_t = np.ones(train.sum(), bool)
            for col in ("is_duplicate", "is_leakage", "is_outlier"):
                if col in f:
                    keep_t &= ~f[col].fillna(0).to_numpy(bool)[train]
        elif name == "drop-agree":
            keep_t &= ~agree
        elif name == "relabel-flagged":
            lab_t[is_label] = sug[is_label]
        elif name == "relabel-sure":  # precision first: both views agree and p̄ >= 0.7
            sure = agree & (sp >= 0.7)
            lab_t[sure] = sug[sure]
        elif name == "drop-sure":  # drop-flagged with flag.label_min_p 0.7: only confident label issues dropped
            keep_t = ~(is_label & (sp >= 0.7))
        elif name == "drop-flagged":  # every label issue dropped (the default before drop-flagged-gated)
            keep_t = ~is_label
        elif name == "drop-label-harm":  # drop the label issues whose removal every seed's model predicts helps
            from pipeline.effect import effects_of

            keep_t = ~(is_label & (effects_of(work / "scores/attribution.npz", tr_ids) < 0).all(0))
        elif name == "tp-relabel":  # diagnostic (uses the truth): relabel-agree without its false positives
            true_t = man["true"].to_numpy()[train]
            sure = agree & (sp >= 0.5) & (true_t != y[train]) & (true_t >= 0)
            lab_t[sure] = true_t[sure]
        else:
            raise SystemExit(f"unknown candidate {name}")
        keep = np.ones(len(man), bool)
        labels = y.copy()
        keep[train] = keep_t
        labels[train] = lab_t
        out[name] = (keep, labels)
    out["_agree"] = agree
    return out


def run(a, log) -> dict:
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    resume = a.resume and (work / "data/pruned.csv").exists()
    truth = make_folder(work / "folder", a.gen_seed, a.kind, a.rate, a.n_train, a.n_test, a.oos, a.conflict, a.leak,
                        write=not resume)
    log(f"folder {'(resumed)' if resume else 'written'} ({len(truth)} images, {time.perf_counter() - t0:.0f} s): "
        + json.dumps({"/".join(k): int(v) for k, v in truth.groupby(["folder", "kind"]).size().items()}))
    if not resume:
        _write_params(a, work)
        stages(work, log)
    man = joined(work, truth)
    flags = pd.read_csv(work / "scores/flags.csv")
    res = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
           "counts": {"/".join(k): int(v) for k, v in truth.groupby(["folder", "kind"]).size().items()}}
    res["issues"] = issue_pr(man, flags)
    log("label issues vs planted flips: " + json.dumps(res["issues"]))
    versions = build_versions(work, man, flags, a.candidates, a.random_of, log)
    res["issues"]["agree (train)"] = versions.pop("_agree_pr")
    accs = {}
    versions = {k: v for k, v in versions.items() if k not in a.skip.split(",")}
    for name, path in versions.items():
        if name != "base" and not (work / "models" / name / "config.json").exists():
            seeds = [x for sd in (a.version_seeds or []) for x in ("--seed", str(sd))]
            clean(work, "train", "--manifest", str(path.relative_to(work)), "--out", f"models/{name}", *seeds, log=log)
        accs[name] = accuracies(work, name, man)
        log(f"  {name}: true {np.mean(accs[name]['true']):.4f} given {np.mean(accs[name]['given']):.4f}")
        res["versions"] = summarise(accs, versions, work, man)
        if a.json:  # after every version: a run stopped early keeps what it measured
            a.json.write_text(json.dumps(res, indent=1, default=float))
    res["seconds"] = round(time.perf_counter() - t0)
    return res


def _write_params(a, work: Path) -> None:
    """work/params.yaml: the repository's defaults, the folder as an imagefolder source, --seeds, --set."""
    import yaml

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["data"].update(source="imagefolder", root=str(work / "folder"))
    if a.seeds:
        params["train"]["seeds"] = a.seeds
    for kv in a.set:
        key, val = kv.split("=", 1)
        sec, k = key.split(".")
        params[sec][k] = yaml.safe_load(val)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stages(work: Path, log) -> None:
    """clean prepare, train, score, flag, prune: the dvc.yaml commands."""
    clean(work, "prepare", "--out", "data", log=log)
    clean(work, "train", "--manifest", "data/manifest.csv", "--out", "models/base", log=log)
    clean(work, "score", "data/manifest.csv", "--model", "models/base", "--out", "scores", log=log)
    clean(work, "flag", "--scores", "scores/scores.csv", "--out", "scores", "--model", "models/base",
          "--manifest", "data/manifest.csv", log=log)
    clean(work, "prune", "--manifest", "data/manifest.csv", "--scores", "scores/scores.csv", "--flags",
          "scores/flags.csv", "--out", "data/pruned.csv", "--summary", "prune/summary.json", log=log)


def issue_pr(man: pd.DataFrame, flags: pd.DataFrame) -> dict:
    """Precision/recall of flags.csv's label issues per split vs the planted wrong labels."""
    f = flags.set_index("id")
    out = {}
    for split in ("train", "val", "test"):
        rows = man[man["split"] == split]
        have = rows["id"].isin(f.index)
        if not have.any():
            continue
        flag = f.reindex(rows["id"])["is_label"].fillna(0).to_numpy(bool)
        wrong = (rows["kind"].isin(["flip", "conflict"])).to_numpy()
        out[split] = pr(flag, wrong)
        hit = flag & wrong
        if "suggested_label" in f and hit.any():
            sug = f.reindex(rows["id"])["suggested_label"].to_numpy()
            out[split]["suggestion_right"] = float((sug[hit] == rows["true"].to_numpy()[hit]).mean())
        if split == "train":
            kind, leaky = rows["kind"].to_numpy(), rows["leaky"].to_numpy()
            # duplicate: the conflicting copy, where its source is in train too; leakage: the train member of a
            # planted pair split between train and val/test (test-image copies, conflict pairs carved apart)
            targets = {"harmful": kind != "clean", "duplicate": (kind == "conflict") & ~leaky, "leakage": leaky,
                       "outlier": kind == "oos"}
            for t, target in targets.items():
                if f"is_{t}" in f:
                    ft = f.reindex(rows["id"])[f"is_{t}"].fillna(0).to_numpy(bool)
                    out[f"{t} (train)"] = pr(ft, target)
    return out


def build_versions(work: Path, man: pd.DataFrame, flags: pd.DataFrame, wanted: list[str], random_of: str,
                   log) -> dict:
    """{name: manifest path}: base, default, candidates, random (as many changed as `random_of`), oracle."""
    train = man["split"].to_numpy() == "train"
    y = man["label"].to_numpy()
    versions = {"base": work / "data/manifest.csv", "default": work / "data/pruned.csv"}
    pruned = pd.read_csv(work / "data/pruned.csv")
    changed = {"default": int(train.sum() - (pruned["split"] == "train").sum())
               + int((pruned.set_index("id")["label"] != man.set_index("id")["label"].reindex(pruned["id"])).sum())}
    cands = candidates(work, man, flags, wanted)
    agree = cands.pop("_agree")
    wrong = man["kind"].isin(["flip", "conflict"]).to_numpy()[train]
    agree_pr = pr(agree, wrong)
    log("agree (label issue ∧ kNN vote = suggestion): " + json.dumps(agree_pr))
    for name, (keep, labels) in cands.items():
        versions[name] = write_version(work, man, name, keep, labels)
        changed[name] = int((~keep[train]).sum() + ((labels != y) & keep)[train].sum())
        tr = train & keep
        log(f"  {name}: {int((~keep[train]).sum())} dropped, {int(((labels != y) & keep)[train].sum())} relabelled; "
            f"wrong labels left {int((labels[tr] != man['true'].to_numpy()[tr]).sum())} "
            f"(base {int((y[train] != man['true'].to_numpy()[train]).sum())})")
    rng = np.random.default_rng(0)
    keep = np.ones(len(man), bool)
    keep[rng.choice(np.flatnonzero(train), changed[random_of], replace=False)] = False
    versions["random"] = write_version(work, man, "random", keep, y)
    kind = man["kind"].to_numpy()
    keep = ~np.isin(kind, ["oos", "conflict", "leak"])
    versions["oracle"] = write_version(work, man, "oracle", keep, np.where(man["true"] >= 0, man["true"], y))
    log(f"  changed per version: {changed}")
    return {**versions, "_agree_pr": agree_pr}


def summarise(accs: dict, versions: dict, work: Path, man: pd.DataFrame) -> dict:
    from pipeline.verdict import compare_runs

    base_t = np.mean(accs["base"]["true"])
    gap = np.mean(accs["oracle"]["true"]) - base_t if "oracle" in accs else 0
    out = {}
    for name, a in accs.items():
        row = {}
        for which in ("true", "given", "unflagged", "unleaked"):
            v = np.array(a[which])
            row[which] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "runs": a[which]}
            if name != "base":
                c = compare_runs(a[which], accs["base"][which])
                row[which].update(diff=c.get("diff"), p=c.get("p"), verdict=c.get("verdict"))
        row["gap_share"] = float((np.mean(a["true"]) - base_t) / gap) if gap > 0 else None
        n_train = int((pd.read_csv(versions[name])["split"] == "train").sum())
        row["n_train"] = n_train
        out[name] = row
    return out


def table(res: dict) -> str:
    a = res["args"]
    lines = [f"### {a['kind']} noise {a['rate']:.0%} in every split, generator seed {a['gen_seed']}, "
             f"base seeds {a['seeds'] or 'train.seeds'}, versions' seeds {a['version_seeds'] or 'train.seeds'}\n", "| split | flagged | planted wrong | precision | recall | suggestion right |",
             "|---|---|---|---|---|---|"]
    for k, v in res["issues"].items():
        sr = f"{v['suggestion_right']:.2f}" if "suggestion_right" in v else ""
        lines.append(f"| {k} | {v['n']} | {v['n_true']} | {v['precision']:.3f} | {v['recall']:.3f} | {sr} |")
    lines += ["", "| version | train images | TRUE test labels | vs base | GIVEN test labels | vs base | "
              "GIVEN, flagged test images left out | vs base | TRUE, test images with a planted copy in train left out | "
              "vs base | oracle gap share |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["versions"].items():
        cells = []
        for which in ("true", "given", "unflagged", "unleaked"):
            w = r[which]
            cells.append(f"{w['mean']:.4f} ± {w['sd']:.4f}")
            p = "" if w.get("p") is None else f" p {w['p']:.2g}"
            cells.append("" if name == "base" else f"{w['diff']:+.4f}{p} {w['verdict']}")
        g = "" if r["gap_share"] is None else f"{100 * r['gap_share']:.0f} %"
        lines.append(f"| {name} | {r['n_train']} | " + " | ".join(cells) + f" | {g} |")
    return "\n".join(lines)


def split_rows(work: Path, truth: pd.DataFrame) -> dict:
    """{split: dict of arrays}: flags.csv's label issue, suggested_p / label, the kNN vote (train)
    and the planted truth (wrong = flip or conflicting copy) of every image of that split."""
    man = joined(work, truth)
    f = pd.read_csv(work / "scores/flags.csv").set_index("id")
    out = {}
    for split in ("train", "val", "test"):
        rows = man[man["split"] == split]
        fr = f.reindex(rows["id"])
        out[split] = {"wrong": rows["kind"].isin(["flip", "conflict"]).to_numpy(),
                      "is_label": fr["is_label"].fillna(0).to_numpy(bool), "p": fr["suggested_p"].to_numpy(),
                      "agree": ((fr["knn_label"] == fr["suggested_label"]).to_numpy()
                                if "knn_label" in fr and fr["knn_label"].notna().any() else None)}
    return out


def tradeoff(noisy: dict, clean_: dict, cuts=(0.0, 0.5, 0.6, 0.7, 0.8)) -> str:
    """Markdown table: label issues kept only where suggested_p >= cut (train: and the kNN vote
    agrees) → precision / recall on the noisy folder and the share flagged on the clean one."""
    lines = ["| split | rule | noisy precision | noisy recall | clean: share flagged |", "|---|---|---|---|---|"]
    for split in ("train", "val", "test"):
        n, c = noisy[split], clean_[split]
        for cut in cuts:
            for knn in ((False, True) if n["agree"] is not None else (False,)):
                m = n["is_label"] & (n["p"] >= cut) & (n["agree"] if knn else True)
                mc = c["is_label"] & (c["p"] >= cut) & (c["agree"] if knn else True)
                tp = int((m & n["wrong"]).sum())
                rule = f"label issue, p̄ ≥ {cut:g}" + (" ∧ kNN vote = suggestion" if knn else "")
                lines.append(f"| {split} | {rule} | {tp / max(int(m.sum()), 1):.3f} | {tp / max(int(n['wrong'].sum()), 1):.3f} "
                             f"| {100 * mc.mean():.2f} % |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gen-seed", type=int, default=1)
    ap.add_argument("--kind", default="pairs", choices=["pairs", "symmetric", "none"])
    ap.add_argument("--rate", type=float, default=0.15)
    ap.add_argument("--n-train", type=int, default=11200, help="images in train/ (val is carved from it)")
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--oos", type=float, default=0.01)
    ap.add_argument("--conflict", type=float, default=0.01)
    ap.add_argument("--leak", type=float, default=0.005)
    ap.add_argument("--seeds", type=int, nargs="*", default=None, help="train.seeds (default: params.yaml's)")
    ap.add_argument("--candidates", default="relabel-agree,drop-agree",
                    help="comma-separated: relabel-agree, relabel-agree-drop-rest, drop-agree, relabel-flagged, "
                         "relabel-sure, tp-relabel (label remedies that also drop the flagged out-of-set images, "
                         "conflicting and leaked copies); drop-sure, drop-flagged, drop-label-harm (label issues "
                         "only); drop-other (only the out-of-set images and those copies); drop-issues (every "
                         "is_duplicate / is_leakage / is_outlier, labels kept)")
    ap.add_argument("--random-of", default="default", help="random removal of as many as this version changes")
    ap.add_argument("--skip", default="", help="versions not trained, e.g. random,oracle")
    ap.add_argument("--version-seeds", type=int, nargs="*", default=None,
                    help="seeds of the retrained versions (default: train.seeds); base keeps its own")
    ap.add_argument("--resume", action="store_true", help="reuse --work's folder, base model, scores and flags")
    ap.add_argument("--set", nargs="*", default=[], help="params overrides, e.g. train.epochs=5")
    ap.add_argument("--clean-work", type=Path, default=None,
                    help="with --resume: a finished --kind none run of the same generator seed; prints the "
                         "threshold trade-off (noisy precision / recall vs share flagged on clean data) and exits")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    a.candidates = [c for c in a.candidates.split(",") if c]
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    def log(m):
        print(m, flush=True)

    if a.clean_work:
        def truth(kind, work):
            return folder_truth(work, a.gen_seed, kind, a.rate, a.n_train, a.n_test, a.oos, a.conflict, a.leak)
        print(tradeoff(split_rows(a.work, truth(a.kind, a.work)), split_rows(a.clean_work, truth("none", a.clean_work))))
        return
    res = run(a, log)
    print("\n" + table(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1, default=float))


if __name__ == "__main__":
    main()
