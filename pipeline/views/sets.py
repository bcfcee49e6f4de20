"""Duplicate sets as the pages show them (the report and `clean review`).

flags.csv has a row per training image only; the val/test members of a set are named by
scores/issues.json (pipeline/rules/duplicates.py writes both).
"""
from __future__ import annotations


def eval_members(facts: dict | None, group_of: dict) -> dict[int, list[int]]:
    """The val/test members of each duplicate set, from issues.json's `duplicate` facts (its leakage pairs,
    complete up to duplicates.MAX_LEAK_PAIRS, and its example sets) and {training id: set} (flags.csv duplicate_group)
    → {set: sorted val/test ids}. flags.csv has no row for them; the report and `clean review` show them."""
    facts = facts if isinstance(facts, dict) else {}
    leak = facts.get("leakage") if isinstance(facts.get("leakage"), dict) else {}
    out: dict[int, set] = {}
    for pr in leak.get("pairs") or []:
        try:  # a hand-edited issues.json: a pair without ids is skipped, not a crash of the page
            t, e = int(pr["train_id"]), int(pr["eval_id"])
        except (TypeError, KeyError, ValueError):
            continue
        if group_of.get(t) is not None:
            out.setdefault(int(group_of[t]), set()).add(e)
    conflicts = facts.get("conflicts") if isinstance(facts.get("conflicts"), dict) else {}
    for ex in [*(facts.get("examples") or []), *(leak.get("examples") or []), *(conflicts.get("examples") or [])]:
        try:
            g, evs = int(ex["group"]), [int(i) for i in ex.get("eval_ids") or []]
        except (TypeError, KeyError, ValueError, AttributeError):
            continue
        if evs:
            out.setdefault(g, set()).update(evs)
    return {g: sorted(v) for g, v in out.items()}
