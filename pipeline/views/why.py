"""Why an image was flagged, in one line per issue type: the statistic, the cut, the neighbour.

Shared by the report (pipeline/views/report.py) and `clean review` (pipeline/views/review.py);
:func:`facts_line` also by `clean flag`'s table.
`row` is a flags.csv row (dict), `facts` the type's entry of issues.json (its cut and rule).
"""
from __future__ import annotations


def _num(v, digits: int = 3) -> str:
    try:
        return f"{float(v):.{digits}g}"
    except (TypeError, ValueError):
        return "?"


def _id(v) -> int | None:
    try:
        i = int(v)
    except (TypeError, ValueError, OverflowError):
        return None
    return i if i >= 0 else None


#: issues.json keys that are not facts of the detector's cut (shown elsewhere, or not at all)
NOT_FACTS = ("rule", "n", "examples", "seconds")


def facts_line(facts: dict) -> str:
    """An issue type's scalar facts from issues.json as one line, "key value; ...": floats to 4
    significant digits (a cut of 0.2756804543264329 reads 0.2757); lists, dicts and NOT_FACTS left out.
    Shared by `clean flag`'s table and the report."""
    return "; ".join(f"{k} {f'{v:.4g}' if isinstance(v, float) else v}" for k, v in facts.items()
                     if k not in NOT_FACTS and not isinstance(v, (list, dict)))


def examples_line(examples: list, k: int = 3) -> str:
    """The first `k` of an issue type's issues.json examples as one line: ids, or for a set of copies
    its members joined by "/" (train ids, then val/test ids), e.g. "2153/6549, 2198/6551"."""
    def one(e) -> str:
        if isinstance(e, dict):
            return "/".join(str(i) for i in list(e.get("train_ids", [])) + list(e.get("eval_ids", [])))
        return str(e)
    return ", ".join(one(e) for e in list(examples or [])[:k])


def why(row: dict, kind: str, facts: dict | None) -> str:
    """One human-readable reason for `kind` on this flags.csv row ('' when there is nothing to add)."""
    facts = facts if isinstance(facts, dict) else {}
    cut = facts.get("cut", facts.get("threshold"))
    if kind == "duplicate":
        if str(row.get("split", "train")) not in ("train", "nan"):
            return f"a {row.get('split')} image of the set (leakage)"
        of = _id(row.get("duplicate_of"))
        if of is None or of == _id(row.get("id")):
            return "the copy kept in its set"
        conflict = " (another label: a label conflict)" if row.get("duplicate_conflict") else ""
        dist = 1 - float(row.get("duplicate_score", 1))
        c = row.get("duplicate_cut")
        try:
            c = float(c)
        except (TypeError, ValueError):
            c = float("nan")
        if c != c:  # no cut recorded (an older flags.csv)
            tail = f"distance {_num(dist)}"
        elif c == 0.0:
            tail = "the same pixels"
        elif "copy_ratio" in facts:
            why_cut = (f"{_num(facts['copy_ratio'])} × what the two see from their ordinary neighbours"
                       if c > float(facts.get("d_exact", 0)) * (1 + 1e-6) else "a re-encoded copy's, whatever the neighbours")
            tail = f"aligned pixel distance {_num(dist)} ≤ cut {_num(c)} ({why_cut})"
        else:
            tail = f"distance {_num(dist)} < cut {_num(c)}"
        return f"a copy of #{of}, the one kept{conflict}; {tail}"
    if kind == "leakage":
        ev = _id(row.get("leakage_of"))
        return f"a copy of val/test image #{ev}" if ev is not None else "a copy of a val/test image"
    if kind == "outlier":
        nb = _id(row.get("outlier_neighbour"))
        ref = f", the {1 - float(facts['fpr']):.1%} quantile of val images'" if "fpr" in facts else ""
        models = int(facts.get("models", 1) or 1)
        what = f"k-th neighbour distance (mean of {models} seed models)" if models > 1 else "k-th neighbour distance"
        return (f"{what} {_num(row.get('outlier_score'))} > cut {_num(cut)}{ref}"
                + (f"; nearest training image #{nb}" if nb is not None else ""))
    if kind == "blurry":
        return (f"{facts.get('statistic', 'sharpness')} = {_num(row.get('blurry_stat'))} < cut {_num(cut)} "
                f"(at most {float(facts.get('fpr_max', 0)):.1%} of the set)")
    if kind == "dark":
        return f"99th brightness percentile {_num(1 - float(row.get('dark_score', 1)))} < {_num(cut)}"
    if kind == "light":
        return f"5th brightness percentile {_num(row.get('light_score'))} > {_num(1 - float(cut or 0))}"
    return str(facts.get("rule", ""))
