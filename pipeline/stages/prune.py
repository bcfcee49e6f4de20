"""The `prune` stage: a new dataset version = the manifest with a subset of training ids.

Validation/test rows are kept untouched; images are never copied or deleted.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import PruneConfig
from pipeline.decisions import apply_decisions, read_decisions
from pipeline.errors import CleanError
from pipeline.formats.manifest import classes_path_for, read_classes, read_manifest, write_manifest
from pipeline.formats.tables import read_scores
from pipeline.io import write_json
from pipeline.registry import STRATEGIES
from pipeline.strategies import PruneInputs, summary


def prune(manifest: str | Path, scores_csv: str | Path, out_manifest: str | Path, summary_path: str | Path,
          config: PruneConfig = PruneConfig(), flags_csv: str | Path | None = None,
          decisions: str | Path | None = None, metrics: str | Path | None = None) -> dict:
    """Select training samples → out_manifest (same columns, kept train rows + all val/test rows)
    and summary_path (JSON: strategy, kept per class, label entropy of kept vs all vs uniform).
    The strategy `config.strategy` (STRATEGIES registry) decides what is kept and with which label;
    `flags_csv`: flags.csv for the strategies that read it. `decisions`: a review's decisions.csv
    (pipeline/decisions.py; used when the file exists), applied on top of the strategy — a
    person's decision always wins; relabels become label overrides (`label` = the label trained
    on, `orig_label` = the source's label). With scores/attribution.npz beside `scores_csv` the
    summary's `effect` is the predicted change of the mean validation loss (pipeline/effect.py);
    `metrics` (e.g. metrics/pred.json) gets it as {"dloss": nats} — the column `clean retrain` fills
    with the measured change in metrics/<version>.json, so `dvc metrics show` puts them one under
    the other ({} without a prediction). Returns the summary dict."""
    manifest = Path(manifest)
    _check_outputs(manifest, scores_csv, out_manifest, summary_path, flags_csv, decisions)
    if config.strategy not in STRATEGIES:
        raise CleanError(f"prune.strategy = {config.strategy!r} is not allowed; use one of: {', '.join(STRATEGIES)}")
    classes = read_classes(classes_path_for(manifest))["classes"]
    df = read_manifest(manifest, classes)
    train = df[df["split"] == "train"]
    sc = _scores_of(train, read_scores(scores_csv), scores_csv, manifest)
    ids, labels = train["id"].to_numpy(), train["label"].to_numpy(np.int64)
    inputs = PruneInputs(labels, config, scores=sc, scores_csv=scores_csv, flags_csv=flags_csv, ids=ids)
    result = STRATEGIES[config.strategy].fn(inputs)
    out, labels, kept_pos, facts = _with_decisions(df, train, result.labels, result.positions, decisions, classes,
                                                   manifest)
    write_manifest(out, out_manifest, manifest)
    summ = summary(labels, kept_pos, len(classes), classes)
    summ.update(facts)
    summ.update({"strategy": config.strategy, **result.facts, "balanced": config.balanced, "seed": config.seed,
                 "manifest": str(out_manifest)})
    if "noisy" in train.columns:
        noisy = train["noisy"].to_numpy().astype(bool)
        kept = np.zeros(len(train), bool)
        kept[kept_pos] = True
        summ["noisy_removed"] = int((noisy & ~kept).sum())
        summ["noisy_kept"] = int((noisy & kept).sum())
        summ["clean_removed"] = int((~noisy & ~kept).sum())
    summ["effect"] = _effect(Path(scores_csv).parent / "attribution.npz", train, labels, kept_pos)
    write_json(summary_path, summ)
    if metrics is not None:
        from pipeline.effect import flat

        write_json(metrics, flat(summ["effect"]["predicted_dval_loss"]) if summ["effect"] else {})
    return summ


def _effect(path: Path, train, labels, kept_pos) -> dict | None:
    """The predicted change of the mean validation loss of this version (pipeline/effect.py), or
    None without an attribution (no file, or score.importance: false)."""
    from pipeline.effect import predicted_change, read_attribution

    if not path.exists() or read_attribution(path)["effects"].shape[0] == 0:
        return None
    kept = np.zeros(len(train), bool)
    kept[kept_pos] = True
    relabeled = kept & (np.asarray(labels, np.int64) != train["label"].to_numpy(np.int64))
    return predicted_change(path, train["id"].to_numpy(np.int64), ~kept, relabeled)


def _check_outputs(manifest: Path, scores_csv, out_manifest, summary_path, flags_csv, decisions) -> None:
    """CleanError when an output is a folder or would overwrite an input."""
    for out, what in ((out_manifest, "--out"), (summary_path, "--summary")):
        if Path(out).is_dir():
            raise CleanError(f"{what} {out} is a folder; give a file path (e.g. data/pruned.csv, prune/summary.json)")
        if Path(out).resolve() in {Path(f).resolve() for f in (manifest, scores_csv, flags_csv, decisions) if f is not None}:
            raise CleanError(f"{what} {out} would overwrite an input of prune; write the new dataset version "
                             "elsewhere (e.g. --out data/pruned.csv): a dataset version never replaces its source")


def _scores_of(train, sc, scores_csv, manifest: Path):
    """The scores.csv rows of the manifest's training samples, in manifest order; CleanError when
    the scores come from another manifest (other ids, or other labels)."""
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
    return sc


def _with_decisions(df, train, labels, kept_pos, decisions, classes, manifest):
    """Apply a review's decisions (when the file exists) on top of the strategy's choice →
    (manifest rows to write, training labels trained on, kept positions, summary facts).
    `labels`: the training labels after the strategy (the manifest's, unless a strategy
    relabelled). Every changed label is written as a label override: `label` = the new one, and
    the rows get `orig_label` — the source's label: kept as is when noise injection wrote it,
    else the manifest's label (equal to `label` on unchanged rows). A decision applies to the
    image its path names (pipeline/decisions.py), whatever id that image has now."""
    ids = train["id"].to_numpy(np.int64)
    before = train["label"].to_numpy(np.int64)
    paths = dict(zip(df["id"].tolist(), df["path"].tolist()))  # decisions follow their image's path
    decided = read_decisions(decisions, classes, paths, manifest) if decisions is not None else {}
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
