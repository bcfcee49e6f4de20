"""`clean demo`: plant look-alike label noise, run the pipeline as a DVC experiment, and say
what was found and fixed against the planted truth.

The noise is prepare's own (noise.rate, noise.kind=pairs: each corrupted label becomes the
class that looks most like it, c → c+1 unless noise.pairs says otherwise), so the experiment is
an ordinary dataset version: `clean versions` lists it, `dvc exp apply` brings it back.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.errors import CleanError
from pipeline.formats.jsonfile import read_json
from pipeline.tools import run

#: the files the summary reads, relative to the project (written by flag, prune, evaluate, retrain)
FILES = {"flags": "metrics/flags.json", "prune": "prune/summary.json", "base": "metrics/base.json",
         "pruned": "metrics/pruned.json"}


def run_experiment(project: str | Path, rate: float, kind: str, sets: list[str]) -> str:
    """`dvc exp run retrain -S noise.rate=<rate> -S noise.kind=<kind> [-S <sets>...]` in `project`
    (prepare → ... → retrain; figures/report/sweep are left for `dvc repro`). Returns its output."""
    if not 0 < rate < 1:
        raise CleanError(f"--rate {rate}: the planted fraction of training labels must be in (0, 1), e.g. 0.15")
    args = ["exp", "run", "retrain", "-S", f"noise.rate={rate}", "-S", f"noise.kind={kind}"]
    for s in sets:
        if "=" not in s:
            raise CleanError(f"--set {s!r}: give KEY=VALUE, e.g. --set train.epochs=5")
        args += ["-S", s]
    r = run("dvc", args, project)
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
        raise CleanError(f"`dvc exp run` failed in {project} (a DVC project with clean's dvc.yaml: this repository, "
                         f"or `clean init --source digits`):\n{tail}")
    return r.stdout


def planted_summary(project: str | Path = ".") -> dict:
    """What the pipeline found and fixed against the planted noise, from the project's files.

    Returns planted (noisy training labels), rate / kind (params.yaml noise), flagged, found (flagged ∩ planted), precision, recall
    (label issues vs planted), removed_planted / kept_planted / removed_clean (the version, prune),
    base / pruned (test accuracy mean over seeds), diff (pruned − base), p and verdict.
    CleanError when a file is missing or the run planted no noise.
    """
    project = Path(project)
    got = {k: read_json(project / f, "missing; run `clean demo` (or `dvc repro`) first", "re-run `clean demo`")
           for k, f in FILES.items()}
    flags, prune, base, pruned = got["flags"], got["prune"], got["base"], got["pruned"]
    if "n_noisy" not in flags or "noisy_removed" not in prune:
        raise CleanError(f"{project / FILES['flags']} knows of no planted noise (noise.rate is 0): run `clean demo`")
    from pipeline.params import load_params

    noise = load_params(project / "params.yaml")["noise"]
    found = round(flags["precision"] * flags["n_flagged"]) if flags.get("precision") is not None else 0
    return {"planted": flags["n_noisy"], "rate": noise["rate"], "kind": noise["kind"], "flagged": flags["n_flagged"], "found": int(found),
            "precision": flags.get("precision"), "recall": flags.get("recall"), "auroc": flags.get("auroc"),
            "strategy": prune.get("strategy"), "kept": prune.get("n_kept"), "total": prune.get("n_total"),
            "removed_planted": prune["noisy_removed"], "kept_planted": prune["noisy_kept"],
            "removed_clean": prune["clean_removed"],
            "base": base.get("accuracy"), "base_sd": base.get("accuracy_std"), "pruned": pruned.get("accuracy"),
            "pruned_sd": pruned.get("accuracy_std"), "diff": pruned.get("diff"), "p": pruned.get("p"),
            "verdict": pruned.get("verdict")}
