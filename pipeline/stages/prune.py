"""The `prune` stage: a new dataset version = the manifest with a subset of training ids.

Validation/test rows are kept untouched; images are never copied or deleted.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import CleanError
from pipeline.params import DEFAULTS


_P = DEFAULTS["prune"]


def prune(manifest: str | Path, scores_csv: str | Path, out_manifest: str | Path, summary_path: str | Path,
          strategy: str = _P["strategy"], by: str = _P["by"], keep: float = _P["keep"], skip: float = _P["skip"],
          balanced: bool = _P["balanced"], seed: int = _P["seed"], flags_csv: str | Path | None = None,
          drop: list | None = _P["drop"], decisions: str | Path | None = None,
          relabel_min_p: float = _P["relabel_min_p"]) -> dict:
    """Select training samples → out_manifest (same columns, kept train rows + all val/test rows)
    and summary_path (JSON: strategy, kept per class, label entropy of kept vs all vs uniform).
    `decisions`: a review's decisions.csv (pipeline/decisions.py; used when the file exists),
    applied on top of the strategy — a person's decision always wins; relabels become label
    overrides (`label` = the label trained on, `orig_label` = the source's label).
    Returns the summary dict."""
    from pipeline.formats.manifest import classes_path_for, read_classes, read_manifest, write_manifest
    from pipeline.formats.tables import read_flags, read_scores
    from pipeline.registry import STRATEGIES
    from pipeline.io import write_json
    from pipeline.strategies import issue_mask, select, summary

    manifest = Path(manifest)
    for out, what in ((out_manifest, "--out"), (summary_path, "--summary")):
        if Path(out).is_dir():
            raise CleanError(f"{what} {out} is a folder; give a file path (e.g. data/pruned.csv, prune/summary.json)")
        if Path(out).resolve() in {Path(f).resolve() for f in (manifest, scores_csv, flags_csv, decisions) if f is not None}:
            raise CleanError(f"{what} {out} would overwrite an input of prune; write the new dataset version "
                             "elsewhere (e.g. --out data/pruned.csv): a dataset version never replaces its source")
    classes = read_classes(classes_path_for(manifest))["classes"]
    df = read_manifest(manifest, classes)
    train = df[df["split"] == "train"]
    sc = read_scores(scores_csv)
    train_ids = np.sort(train["id"].to_numpy())
    sc_ids = np.sort(sc["id"].to_numpy())
    if not np.array_equal(train_ids, sc_ids):
        extra = np.setdiff1d(sc_ids, train_ids)
        lack = np.setdiff1d(train_ids, sc_ids)
        what = (f"id {int(extra[0])} is not a training id of the manifest" if len(extra)
                else f"training id {int(lack[0])} has no score")
        raise CleanError(f"{scores_csv} does not match {manifest} ({what}; {len(extra)} extra, {len(lack)} missing); "
                         "the scores come from another manifest: rerun `clean score` on this one")
    sc = sc.set_index("id").loc[train["id"].to_numpy()]
    labels = train["label"].to_numpy(np.int64)
    relabeled = sc["label"].to_numpy(np.int64) != labels
    if relabeled.any():
        i = int(np.flatnonzero(relabeled)[0])
        raise CleanError(f"{scores_csv} does not match {manifest}: id {int(train['id'].iloc[i])} has label "
                         f"{int(sc['label'].iloc[i])} in the scores but {int(labels[i])} in the manifest "
                         f"({int(relabeled.sum())} differ); the manifest changed since scoring: rerun `clean score`")
    flagged = None
    if strategy not in STRATEGIES:
        raise CleanError(f"prune.strategy = {strategy!r} is not allowed; use one of: {', '.join(STRATEGIES)}")
    uses_flags = "flags" in STRATEGIES[strategy].needs
    if uses_flags:
        if flags_csv is None or not Path(flags_csv).exists():
            raise CleanError(f"prune.strategy = {strategy} needs flags ({flags_csv}); run `clean flag` first")
        fl = read_flags(flags_csv, train["id"].to_numpy())
        fl = fl.set_index("id").loc[train["id"].to_numpy()]
        flagged = issue_mask(fl, strategy, flags_csv)  # drop-harmful, drop-flagged-harmful: their own types
        flagged = dropped(fl, drop, flags_csv) if flagged is None else flagged
        values = np.zeros(len(train))
    else:
        if by not in sc.columns:
            raise CleanError(f"prune.by = {by!r} is not a column of {scores_csv}")
        values = sc[by].to_numpy(np.float64)
        if np.isnan(values).all():
            raise CleanError(f"{scores_csv}: column '{by}' is empty (not computed); choose another prune.by "
                             "or rescore with it (e.g. score.self_influence: true)")
        bad = ~np.isfinite(values)
        if bad.any():
            raise CleanError(f"{scores_csv}: column '{by}' has {int(bad.sum())} missing/NaN/inf value(s) (first: id "
                             f"{int(train['id'].iloc[int(np.flatnonzero(bad)[0])])}); choose another prune.by or rescore")
    entry = STRATEGIES[strategy]
    if entry.extra.get("relabels"):  # relabel, relabel-or-drop: a label override per label issue
        other = dropped(fl, [t for t in (drop or []) if t != "label"], flags_csv) if drop else np.zeros(len(fl), bool)
        kept, labels = entry.fn(fl, labels, other, relabel_min_p, flags_csv)
        kept_pos = np.flatnonzero(kept)
        if kept_pos.size == 0:
            raise CleanError(f"prune.strategy = {strategy} would keep no training sample; check prune.drop")
    else:
        kept_pos = select(values, labels, strategy, keep, seed, balanced=balanced, skip=skip, flagged=flagged)
    out, labels, kept_pos, facts = _with_decisions(df, train, labels, kept_pos, decisions, classes)
    write_manifest(out, out_manifest, manifest)
    summ = summary(labels, kept_pos, len(classes), classes)
    summ.update(facts)
    summ.update({"strategy": strategy, "drop": list(drop) if uses_flags and drop is not None else None,
                 "by": None if uses_flags else by,
                 "keep": None if uses_flags else keep, "balanced": balanced, "seed": seed,
                 "skip": skip if strategy == "non-extreme" else None, "manifest": str(out_manifest)})
    if "noisy" in train.columns:
        noisy = train["noisy"].to_numpy().astype(bool)
        kept = np.zeros(len(train), bool)
        kept[kept_pos] = True
        summ["noisy_removed"] = int((noisy & ~kept).sum())
        summ["noisy_kept"] = int((noisy & kept).sum())
        summ["clean_removed"] = int((~noisy & ~kept).sum())
    write_json(summary_path, summ)
    return summ


def _with_decisions(df, train, labels, kept_pos, decisions, classes):
    """Apply a review's decisions (when the file exists) on top of the strategy's choice →
    (manifest rows to write, training labels trained on, kept positions, summary facts).
    `labels`: the training labels after the strategy (the manifest's, unless a strategy
    relabelled). Every changed label is written as a label override: `label` = the new one, and
    the rows get `orig_label` — the source's label: kept as is when noise injection wrote it,
    else the manifest's label (equal to `label` on unchanged rows)."""
    from pipeline.decisions import apply_decisions, read_decisions

    ids = train["id"].to_numpy(np.int64)
    before = train["label"].to_numpy(np.int64)
    decided = read_decisions(decisions, classes) if decisions is not None else {}
    heldout = set(df.loc[df["split"] != "train", "id"].tolist())  # reviewed val/test labels: for evaluate
    decided = {i: d for i, d in decided.items() if i not in heldout}
    facts = {"decisions": str(decisions) if decided else None}
    kept = np.zeros(len(train), bool)
    kept[kept_pos] = True
    labels = np.asarray(labels, np.int64)
    if decided:
        kept, labels, more = apply_decisions(ids, labels, kept, decided, decisions)
        facts.update(more)
        if not kept.any():
            raise CleanError(f"{decisions}: with these decisions no training sample is left; keep some")
        if "orig_label" in train.columns:  # relabels that gave back the label noise injection had replaced
            fixed = (labels != before) & (labels == train["orig_label"].to_numpy(np.int64))
            facts["n_relabeled_to_truth"] = int(fixed.sum())
        kept_pos = np.flatnonzero(kept)
    changed = labels != before
    out = df[(df["split"] != "train") | df["id"].isin(set(ids[kept].tolist()))]
    if changed.any():
        out = out.copy()
        if "orig_label" not in out.columns:
            out["orig_label"] = out["label"]
        override = dict(zip(ids[changed].tolist(), labels[changed].tolist()))
        out["label"] = [override.get(i, lab) for i, lab in zip(out["id"].tolist(), out["label"].tolist())]
    return out, labels, kept_pos, facts


def dropped(flags, drop: list | None, flags_csv) -> np.ndarray:
    """bool [N]: samples with any of the issue types `drop` (flags.csv `is_<type>`); `drop` None,
    or a flags.csv without issue columns (written by an older version), uses `flagged`."""
    if drop is None or not any(c.startswith("is_") for c in flags.columns):
        return flags["flagged"].to_numpy().astype(bool)
    missing = [t for t in drop if f"is_{t}" not in flags.columns]
    if missing:
        raise CleanError(f"prune.drop names issue type {missing[0]!r} but {flags_csv} has no is_{missing[0]} column; "
                         "add it to flag.issues and re-run `clean flag`, or remove it from prune.drop")
    out = np.zeros(len(flags), bool)
    for t in drop:
        out |= flags[f"is_{t}"].to_numpy().astype(bool)
    return out
