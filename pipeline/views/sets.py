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
        g = group_of.get(int(pr["train_id"]))
        if g is not None:
            out.setdefault(int(g), set()).add(int(pr["eval_id"]))
    conflicts = facts.get("conflicts") if isinstance(facts.get("conflicts"), dict) else {}
    for ex in [*(facts.get("examples") or []), *(leak.get("examples") or []), *(conflicts.get("examples") or [])]:
        if isinstance(ex, dict) and ex.get("group") is not None and ex.get("eval_ids"):
            out.setdefault(int(ex["group"]), set()).update(int(i) for i in ex["eval_ids"])
    return {g: sorted(v) for g, v in out.items()}
