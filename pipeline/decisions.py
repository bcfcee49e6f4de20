"""data/decisions.csv: a person's review decisions (`clean review`) and how `prune` applies them.

The file is ``id,path,action,label,note``: one row per decided training sample; ``path`` is the
image's path exactly as the manifest writes it, so a decision follows its image when a new
`prepare` gives it another id (ids are row numbers: adding an image shifts them); ``action`` one of
``keep`` / ``drop`` / ``relabel``; ``label`` is the new class (its name in classes.json; a class
index is accepted too) for ``relabel`` and empty otherwise; ``note`` is free text. A file with
the header only means "no decisions" (the project tracks such a file in git, so the prune stage's
dependency exists in a fresh clone; `clean review` writes one when it is missing).

:func:`apply_decisions` is the ``decisions`` remedy of docs/methods.md §3, applied by `prune`
on top of whichever strategy selected the subset — a person's decision always wins:

- ``drop``    the sample is removed, even if the strategy kept it;
- ``keep``    the sample is kept, even if the strategy dropped it;
- ``relabel`` the sample is kept with the new label (``label`` = the label trained on) and the
  pruned manifest gets ``orig_label`` (see :func:`apply_decisions`).
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from pipeline.checks import input_file
from pipeline.errors import CleanError
from pipeline.io import settled

#: The columns of decisions.csv, in order.
HEADER = ["id", "path", "action", "label", "note"]
#: The columns of a decisions.csv written before decisions carried their image's path.
LEGACY_HEADER = ["id", "action", "label", "note"]
#: The allowed actions.
ACTIONS = ("keep", "drop", "relabel")
#: Longest note kept (characters).
MAX_NOTE = 500


def class_index(label, classes: list[str]) -> int | None:
    """A class name (or a class index written as an integer) → its index; None if unknown."""
    s = str(label).strip()
    if s in classes:
        return classes.index(s)
    try:
        i = int(s)
    except ValueError:
        return None
    return i if 0 <= i < len(classes) and str(i) == s else None


def read_decisions(path: str | Path, classes: list[str], paths: dict[int, str] | None,
                   manifest: str | Path = "the manifest") -> dict[int, dict]:
    """Read decisions.csv → {id: {"action", "label" (class index or None), "note"}}, keyed by the
    manifest's current ids.

    `paths`: {id: path as written in the manifest} of every manifest row (None: ids as written,
    for a file known to belong to the manifest). A decision follows its
    image: a row's `path` names it, and its id is re-pointed when the path moved to another id
    (prepare after images were added); a path that is no longer in the manifest is refused. A row
    without a path (a file from before the path column) is taken by its id only when the file is
    at least as new as `manifest` (the ids are then those it was decided on), else refused.
    A missing file is no decisions ({}). CleanError naming the row and the fix."""
    rows = _rows(path)
    if not rows:
        return {}
    head = [c.strip() for c in rows[0]]
    miss = [c for c in ("id", "action") if c not in head]
    if miss:
        raise CleanError(f"{path}: missing column(s) {', '.join(miss)}; decisions.csv needs the header "
                         f"{','.join(HEADER)} (found: {','.join(head)})")
    col = {c: head.index(c) for c in HEADER if c in head}
    parsed = [_parse(path, n, r, col, classes) for n, r in enumerate(rows[1:], start=2)]
    if paths is not None:
        parsed = _follow(path, parsed, paths, manifest)
    out: dict[int, dict] = {}
    for n, rid, _, d in parsed:
        if rid in out:
            raise CleanError(f"{path}: row {n}: id {rid} is decided twice; keep one row per id (image)")
        out[rid] = d
    return out


#: the largest decisions.csv read (bytes): a person's decisions are a few bytes per image
MAX_BYTES = 256 * 2 ** 20


def _rows(path) -> list[list[str]]:
    """The non-empty CSV rows of a regular file (a UTF-8 BOM, as Excel writes, is no part of the header)."""

    path = settled(path)
    if input_file(path, "decisions must be a CSV file", f"decisions must be a CSV file ({','.join(HEADER)})") is None:
        return []
    fix = "fix the row or decide again with `clean review`"
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
        if len(raw) > MAX_BYTES:
            raise CleanError(f"{path}: larger than {MAX_BYTES // 2 ** 20} MiB; decisions.csv holds one short row "
                             "per decided image: give the file `clean review` wrote")
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline="")))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CleanError(f"{path}: not a readable CSV ({type(e).__name__}: {e}); {fix}") from None
    return [r for r in rows if any(c.strip() for c in r)]


def _parse(path, n: int, r: list[str], col: dict, classes: list[str]) -> tuple[int, int, str, dict]:
    """One row → (row number, id, path or "", {"action", "label", "note"})."""
    fix = "fix the row or decide again with `clean review`"

    def get(c: str) -> str:
        return r[col[c]].strip() if c in col and col[c] < len(r) else ""

    try:
        rid = int(get("id"))
    except ValueError:
        raise CleanError(f"{path}: row {n}: id must be an integer, got {get('id')[:40]!r}; {fix}") from None
    action = get("action").lower()
    if action not in ACTIONS:
        raise CleanError(f"{path}: row {n} (id {rid}): action {get('action')[:40]!r} is not one of "
                         f"{', '.join(ACTIONS)}; {fix}")
    label = None
    if action == "relabel":
        label = class_index(get("label"), classes)
        if label is None:
            raise CleanError(f"{path}: row {n} (id {rid}): relabel to {get('label')[:40]!r}, which is not a class "
                             f"of classes.json ({', '.join(classes[:12])}{' ...' if len(classes) > 12 else ''}); {fix}")
    return n, rid, get("path"), {"action": action, "label": label, "note": get("note")[:MAX_NOTE]}


def _follow(path, parsed: list, paths: dict[int, str], manifest) -> list:
    """Re-key each parsed row by the manifest id of its image path (see :func:`read_decisions`)."""

    by_path = {p: i for i, p in paths.items()}
    out = []
    for n, rid, rpath, d in parsed:
        if rpath:
            if rpath not in by_path:
                raise CleanError(f"{path}: row {n}: image {rpath[:200]!r} (id {rid} when decided) is no longer in "
                                 f"{manifest}; remove the row (the image left the dataset) or put the image back")
            out.append((n, by_path[rpath], rpath, d))
            continue
        try:
            stale = os.stat(path).st_mtime < os.stat(manifest).st_mtime
        except OSError:
            stale = False
        if stale:
            raise CleanError(f"{path}: row {n} (id {rid}) names no image (no path column) and {manifest} was written "
                             f"after it, so id {rid} may now be another image; if the ids still name the images you "
                             f"decided on, run `touch {path}` and then `clean review` once (it records each image's "
                             "path), else decide again with `clean review`")
        out.append((n, rid, paths.get(rid, ""), d))
    return out


def write_decisions(path: str | Path, decisions: dict[int, dict], classes: list[str],
                    paths: dict[int, str]) -> None:
    """Write decisions ({id: {"action", "label" index|None, "note"}}) atomically, sorted by id, each
    with its image's path as the manifest writes it (`paths`: {id: path}), so it follows the image."""
    from pipeline.io import write_csv

    rows = [(i, paths.get(i, ""), d["action"], classes[d["label"]] if d["action"] == "relabel" else "",
             d.get("note", "") or "") for i, d in sorted(decisions.items())]
    write_csv(path, HEADER, rows)


def ensure_file(path: str | Path) -> bool:
    """Create an empty decisions.csv (header only) when there is none; True if it was created."""
    from pipeline.io import write_csv

    path = Path(path)
    if path.exists():
        return False
    write_csv(path, HEADER, [])
    return True


def apply_decisions(ids, labels, kept, decisions: dict[int, dict], path: str | Path = "decisions.csv"):
    """Apply a person's decisions on top of a strategy's selection.

    ids: int [N] training ids; labels: int [N] their manifest labels; kept: bool [N] the strategy's
    selection; decisions: :func:`read_decisions`' dict (ids must be training ids: val/test stay
    untouched). Returns (kept bool [N], labels int [N] after relabels, facts dict): drop removes,
    keep keeps, relabel keeps with the new label. facts: n_decisions, n_review_dropped,
    n_review_kept, n_relabeled, n_review_overrode (decisions that changed the strategy's choice)."""
    ids = np.asarray(ids, np.int64)
    kept = np.asarray(kept, bool).copy()
    new = np.asarray(labels, np.int64).copy()
    pos = {int(i): k for k, i in enumerate(ids.tolist())}
    unknown = [i for i in decisions if i not in pos]
    if unknown:
        raise CleanError(f"{path}: id {unknown[0]} is not a training sample of the manifest ({len(unknown)} such "
                         "id(s)); decisions apply to training samples only (val/test stay untouched) — the decisions "
                         "come from another dataset version: remove those rows or review again with `clean review`")
    facts = {"n_decisions": len(decisions), "n_review_dropped": 0, "n_review_kept": 0, "n_relabeled": 0,
             "n_review_overrode": 0}
    for i, d in decisions.items():
        k = pos[i]
        before = bool(kept[k])
        if d["action"] == "drop":
            kept[k] = False
            facts["n_review_dropped"] += 1
        else:
            kept[k] = True
            if d["action"] == "relabel" and d["label"] != new[k]:
                new[k] = d["label"]
                facts["n_relabeled"] += 1
            else:
                facts["n_review_kept"] += 1
        facts["n_review_overrode"] += int(before != kept[k])
    return kept, new, facts
