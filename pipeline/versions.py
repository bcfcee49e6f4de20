"""`clean versions`: the dataset versions of a DVC project side by side, from `dvc exp show --json`.

One row per commit shown (the workspace, the baseline commit) and per experiment: the prune
strategy (and keep fraction), other params that differ from the baseline, images kept of the
training set, the base and pruned test accuracy (mean ± sd over seeds), the difference, p and the
verdict (metrics/pruned.json, pipeline/verdict.py).
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import CleanError
from pipeline.tools import run

#: params shown in their own column, never among the "changed" ones
OWN = ("prune.strategy", "prune.keep")
#: params that only say where or how fast it runs, never what the version is
QUIET = ("train.device", "train.workers", "train.amp", "data.cache_max_gb", "score.batch_size")


def exp_show(repo: str | Path = ".", all_commits: bool = False) -> list:
    """Run `dvc exp show --json` in `repo` → its parsed list (one entry per commit shown)."""
    args = ["exp", "show", "--json"] + (["--all-commits"] if all_commits else [])
    r = run("dvc", args, repo)
    if r.returncode != 0:
        raise CleanError(f"`dvc exp show --json` failed in {repo}: {(r.stderr or r.stdout).strip()[:400]}; "
                         "run `clean versions` in a DVC project (clean init, then dvc repro)")
    try:
        return json.loads(r.stdout or "[]")
    except json.JSONDecodeError as e:
        raise CleanError(f"`dvc exp show --json` printed no JSON ({e}); is DVC >= 3.0 installed?") from None


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _params(data: dict) -> dict:
    files = (data or {}).get("params") or {}
    return _flat((files.get("params.yaml") or {}).get("data") or {})


def _metrics(data: dict, name: str) -> dict:
    return ((data or {}).get("metrics") or {}).get(f"metrics/{name}.json", {}).get("data") or {}


def _strategy(p: dict) -> str:
    from pipeline.registry import STRATEGIES

    s = p.get("prune.strategy")
    if s is None:
        return "-"
    uses_keep = s not in STRATEGIES or "flags" not in STRATEGIES[s].needs  # drop-*/relabel* ignore prune.keep
    keep = p.get("prune.keep")
    return f"{s} {keep:g}" if uses_keep and isinstance(keep, (int, float)) else str(s)


def _row(name: str, data: dict, base_params: dict) -> dict:
    p = _params(data)
    base, pruned = _metrics(data, "base"), _metrics(data, "pruned")
    changed = {k: v for k, v in p.items() if k not in OWN and k not in QUIET and base_params.get(k) != v}
    return {"version": name, "strategy": _strategy(p),
            "changed": ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sorted(changed.items())),
            "kept": pruned.get("n_train"), "of": base.get("n_train"),
            "base": base.get("accuracy"), "base_sd": base.get("accuracy_std"),
            "accuracy": pruned.get("accuracy"), "sd": pruned.get("accuracy_std"),
            "diff": pruned.get("diff"), "p": pruned.get("p"), "verdict": pruned.get("verdict")}


def version_rows(shown: list) -> list[dict]:
    """`dvc exp show --json` (parsed) → one dict per version: version, strategy, changed (params
    differing from the version's baseline commit), kept / of (training images), base and accuracy
    (test accuracy mean) with base_sd / sd, diff, p, verdict (None when a metric is missing)."""
    commits = [e for e in shown if e.get("rev") != "workspace"]
    head = _params((commits[0].get("data") or {})) if commits else {}
    rows = []
    for entry in shown:
        data = entry.get("data") or {}
        if entry.get("rev") == "workspace":
            rows.append(_row("workspace", data, head))
            continue
        name = f"{entry['name']}@{entry['rev'][:7]}" if entry.get("name") else entry["rev"][:7]
        base_params = _params(data)
        rows.append(_row(name, data, base_params))
        for exp in entry.get("experiments") or []:
            revs = exp.get("revs") or []
            if revs:
                rows.append(_row(exp.get("name") or revs[0]["rev"][:7], revs[0].get("data") or {}, base_params))
    return rows
