"""scores/scores.csv and scores/flags.csv: the one reader of each (and their join).

Every reader checks what its consumers rely on and raises :class:`CleanError` naming the
file, the row and the fix; no other module parses these files.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pipeline.errors import CleanError
from pipeline.formats.manifest import classes_path_for, integer_column, read_classes, read_manifest
from pipeline.io import settled
from pipeline.registry import SCORES

#: pandas options shared by every CSV read here ("NA" in a path stays a string).
_CSV = dict(keep_default_na=False, na_values=["", "nan", "NaN"])


def read_csv(path: str | Path, what: str, fix: str, **kw):
    """pandas.read_csv with one clear CleanError for a missing or unparsable file."""
    import pandas as pd

    path = settled(path)  # a commit of several files that a kill interrupted is finished first
    if not path.exists():
        raise CleanError(f"{what} not found: {path}; {fix}")
    if path.is_dir():
        raise CleanError(f"{path} is a folder; {what} must be a CSV file")
    try:
        return pd.read_csv(path, **{**_CSV, **kw})
    except Exception as e:  # noqa: BLE001 - any parser failure is a bad input file
        msg = " ".join(str(e).split())[:200]
        raise CleanError(f"{path}: not a readable CSV ({type(e).__name__}: {msg}); {fix}") from None


def _unique_ids(df, path: Path, fix: str) -> None:
    if df["id"].duplicated().any():
        raise CleanError(f"{path}: duplicate id {int(df['id'][df['id'].duplicated()].iloc[0])}; {fix}")


def read_scores(path: str | Path, need=()):
    """Read scores.csv → DataFrame; CleanError when missing, unreadable or malformed.

    Checks: columns id, label and `need`; at least one row; integer ids (unique), labels,
    pred and noisy; numeric score columns (float64; NaN = a score that was not computed).
    """
    import pandas as pd

    path = Path(path)
    fix = "regenerate it with `clean score`"
    df = read_csv(path, "scores", "run `clean score` first", dtype={"path": str})
    miss = [c for c in ["id", "label", *need] if c not in df.columns]
    if miss:
        raise CleanError(f"{path}: missing column(s) {', '.join(miss)}; {fix} "
                         f"(score columns: {', '.join(SCORES.names())})")
    if len(df) == 0:
        raise CleanError(f"{path}: no rows; {fix}")
    for col in ["id", "label"] + [c for c in ("pred", "noisy", "orig_label") if c in df.columns]:
        integer_column(df, col, path, fix)
    for col in [c for c in SCORES.names() if c in df.columns]:
        vals = pd.to_numeric(df[col], errors="coerce")
        bad = vals.isna() & df[col].notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise CleanError(f"{path}: column '{col}' must hold numbers; row {row + 2} has {df[col].iloc[row]!r}; {fix}")
        df[col] = vals.astype(np.float64)
    _unique_ids(df, path, fix)
    return df


def read_flags(path: str | Path, ids=None, heldout: bool = False):
    """Read flags.csv → DataFrame (id int, flagged bool, rule str, value float, ...).

    `flagged` accepts 0/1 and true/false. `ids`: the training ids it must cover exactly
    (flags from another scores file or manifest → CleanError). The training rows only, unless
    `heldout`: then also the val/test rows (`split` column; their label issues).
    """
    import pandas as pd

    path = Path(path)
    fix = "re-run `clean flag`"
    df = read_csv(path, "flags", "run `clean flag` first", dtype={"rule": str})
    miss = [c for c in ("id", "flagged") if c not in df.columns]
    if miss:
        raise CleanError(f"{path}: missing column(s) {', '.join(miss)}; {fix}")
    integer_column(df, "id", path, fix)
    f = df["flagged"].astype(str).str.strip().str.lower()
    ok = f.isin(["0", "1", "true", "false", "0.0", "1.0"])
    if not ok.all():
        row = int(np.flatnonzero(~ok.to_numpy())[0])
        raw = df["flagged"].iloc[row]
        raise CleanError(f"{path}: column 'flagged' must be 0 or 1; row {row + 2} has "
                         f"{raw.item() if hasattr(raw, 'item') else raw!r}; {fix}")
    df["flagged"] = f.isin(["1", "true", "1.0"]).to_numpy()
    for col in [c for c in df.columns if c.startswith("is_")]:
        v = df[col].astype(str).str.strip().str.lower()
        bad = ~v.isin(["0", "1", "true", "false", "0.0", "1.0"])
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise CleanError(f"{path}: column '{col}' must be 0 or 1; row {row + 2} has {df[col].iloc[row]!r}; {fix}")
        df[col] = v.isin(["1", "true", "1.0"]).to_numpy()
    df["rule"] = df["rule"].fillna("").astype(str) if "rule" in df.columns else ""
    if "value" not in df.columns:
        df["value"] = np.nan
    for col in [c for c in df.columns if c == "value" or c.endswith("_score") or c.startswith(("suggested_", "duplicate_", "knn_"))]:
        vals = pd.to_numeric(df[col], errors="coerce")  # every such column is numeric (empty = NaN)
        bad = vals.isna() & df[col].notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise CleanError(f"{path}: column '{col}' must hold numbers; row {row + 2} has {df[col].iloc[row]!r}; {fix}")
        df[col] = vals
    _unique_ids(df, path, fix)
    if "split" in df.columns and not heldout:
        df = df[df["split"].astype(str) == "train"].reset_index(drop=True)
    if ids is not None:
        have, want = set(df["id"].tolist()), set(np.asarray(ids).tolist())
        if have != want:
            extra, lack = sorted(have - want), sorted(want - have)
            what = (f"id {extra[0]} is not a training id" if extra else f"training id {lack[0]} has no flag")
            raise CleanError(f"{path} does not match the training ids ({what}; {len(extra)} extra, {len(lack)} "
                             f"missing); the flags come from other scores: {fix}")
    return df


def check_scores_fit(scores, scores_path: str | Path, manifest: str | Path) -> None:
    """CleanError unless every scored sample is a sample of `manifest`: its id is there, with the
    same label and the same image (scores of another dataset, or of an older version of this
    one, are refused). Image paths are compared as files: a scores path is read from the folder
    of the manifest its meta.json names (else from `manifest`'s)."""

    manifest = Path(manifest)
    m = read_manifest(manifest, read_classes(classes_path_for(manifest))["classes"]).set_index("id")
    ids = scores["id"].to_numpy(np.int64)
    missing = np.setdiff1d(ids, m.index.to_numpy())
    if len(missing):
        raise CleanError(f"scores hold id {int(missing[0])} which is not in {manifest}; the scores come from "
                         "another manifest: rerun `clean score`")
    rows = m.loc[ids]
    differ = rows["label"].to_numpy(np.int64) != scores["label"].to_numpy(np.int64)
    if "path" in scores.columns:
        base = manifest.parent
        try:
            named = json.loads((Path(scores_path).parent / "meta.json").read_text(encoding="utf-8")).get("manifest")
            base = Path(named).parent if named else base
        except (OSError, ValueError, AttributeError):
            pass

        def where(p, folder) -> str:
            p = str(p)
            return os.path.normpath(p if os.path.isabs(p) else os.path.join(folder, p))

        differ |= np.array([where(a, base) != where(b, manifest.parent)
                            for a, b in zip(scores["path"], rows["path"])], bool)
    if differ.any():
        i = int(np.flatnonzero(differ)[0])
        a, b = scores.iloc[i], rows.iloc[i]
        what = (f"is {a['path']!r} with label {int(a['label'])} in the scores but {b['path']!r} with label "
                f"{int(b['label'])}" if "path" in scores.columns else
                f"has label {int(a['label'])} in the scores but {int(b['label'])}")
        raise CleanError(f"{scores_path} does not match {manifest}: id {int(ids[i])} {what} in the manifest "
                         f"({int(differ.sum())} differ); the scores come from another dataset: pass the manifest "
                         "they were computed on (--manifest) or rerun `clean score`")


def join_flags(scores, flags, flags_path: str | Path = "flags.csv"):
    """scores DataFrame + flags DataFrame (by id) → scores with flagged/rule/flag_value columns."""
    extra = set(flags["id"]) - set(scores["id"])
    if extra:
        raise CleanError(f"{flags_path}: id {sorted(extra)[0]} is not in the scores file ({len(extra)} unknown id(s)); "
                         "flags and scores must come from the same `clean score` run (re-run `clean flag`)")
    f = flags[["id", "flagged", "rule", "value"]].rename(columns={"value": "flag_value"})
    out = scores.drop(columns=[c for c in ("flagged", "rule", "flag_value") if c in scores.columns])
    out = out.merge(f, on="id", how="left")
    out["flagged"] = out["flagged"].fillna(False).astype(bool)
    out["rule"] = out["rule"].fillna("")
    return out
