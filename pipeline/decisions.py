"""data/decisions.csv: a person's review decisions (`clean review`) and how `prune` applies them.

The file is ``id,action,label,note``: one row per decided training sample, ``action`` one of
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

from pathlib import Path

import numpy as np

from pipeline.errors import CleanError

#: The columns of decisions.csv, in order.
HEADER = ["id", "action", "label", "note"]
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


def read_decisions(path: str | Path, classes: list[str]) -> dict[int, dict]:
    """Read decisions.csv → {id: {"action", "label" (class index or None), "note"}}.

    A missing file is no decisions ({}). Checks: the columns id and action, integer unique ids,
    known actions, a known class for every relabel. CleanError naming the row and the fix."""
    import csv

    from pipeline.io import settled

    path = settled(path)
    if not path.exists():
        return {}
    if path.is_dir():
        raise CleanError(f"{path} is a folder; decisions must be a CSV file (id,action,label,note)")
    fix = "fix the row or decide again with `clean review`"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CleanError(f"{path}: not a readable CSV ({type(e).__name__}: {e}); {fix}") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        return {}
    head = [c.strip() for c in rows[0]]
    miss = [c for c in ("id", "action") if c not in head]
    if miss:
        raise CleanError(f"{path}: missing column(s) {', '.join(miss)}; decisions.csv needs the header "
                         f"{','.join(HEADER)} (found: {','.join(head)})")
    col = {c: head.index(c) for c in HEADER if c in head}
    out: dict[int, dict] = {}
    for n, r in enumerate(rows[1:], start=2):
        def get(c: str) -> str:
            return r[col[c]].strip() if c in col and col[c] < len(r) else ""

        try:
            rid = int(get("id"))
        except ValueError:
            raise CleanError(f"{path}: row {n}: id must be an integer, got {get('id')!r}; {fix}") from None
        if rid in out:
            raise CleanError(f"{path}: row {n}: id {rid} is decided twice; keep one row per id")
        action = get("action").lower()
        if action not in ACTIONS:
            raise CleanError(f"{path}: row {n} (id {rid}): action {get('action')!r} is not one of "
                             f"{', '.join(ACTIONS)}; {fix}")
        label = None
        if action == "relabel":
            label = class_index(get("label"), classes)
            if label is None:
                raise CleanError(f"{path}: row {n} (id {rid}): relabel to {get('label')!r}, which is not a class "
                                 f"of classes.json ({', '.join(classes[:12])}{' ...' if len(classes) > 12 else ''}); {fix}")
        out[rid] = {"action": action, "label": label, "note": get("note")[:MAX_NOTE]}
    return out


def write_decisions(path: str | Path, decisions: dict[int, dict], classes: list[str]) -> None:
    """Write decisions ({id: {"action", "label" index|None, "note"}}) atomically, sorted by id."""
    from pipeline.io import write_csv

    rows = [(i, d["action"], classes[d["label"]] if d["action"] == "relabel" else "", d.get("note", "") or "")
            for i, d in sorted(decisions.items())]
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
