"""Is a dataset version better than another beyond seed noise? Welch's t-test on the per-seed
test accuracies of the two versions (docs/methods.md §5.4)."""
from __future__ import annotations

import math

import numpy as np

#: two-sided significance level of the verdict
ALPHA = 0.05


def compare_runs(new, base, alpha: float = ALPHA) -> dict:
    """Welch's t-test of per-seed accuracies `new` [n1] against `base` [n2] → flat dict:

    diff = mean(new) − mean(base); ci_low / ci_high: its 95 % confidence interval
    (Welch–Satterthwaite degrees of freedom); p: two-sided p-value; verdict: "better" /
    "worse" (p < alpha) or "n.s." (not significant: within seed noise). With fewer than 2
    seeds on either side there is no test: p and the interval are None, verdict "no test".
    Short keys and values: `dvc metrics show` must fit 120 columns.
    """
    from scipy import stats

    a, b = np.asarray(new, np.float64), np.asarray(base, np.float64)
    diff = float(a.mean() - b.mean())
    out = {"diff": round(diff, 6), "ci_low": None, "ci_high": None, "p": None}
    if len(a) < 2 or len(b) < 2:
        out["verdict"] = "no test"  # train.seeds needs ≥ 2 seeds per version
        return out
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0.0:
        p, half = (1.0 if diff == 0 else 0.0), 0.0
    else:
        dof = (va + vb) ** 2 / ((va ** 2 / (len(a) - 1) if va else 0.0) + (vb ** 2 / (len(b) - 1) if vb else 0.0))
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
        half = float(stats.t.ppf(1 - alpha / 2, dof)) * se
    out.update({"ci_low": round(diff - half, 6), "ci_high": round(diff + half, 6), "p": round(p, 6)})
    out["verdict"] = ("better" if diff > 0 else "worse") if p < alpha else "n.s."
    return out


def sentence(name: str, base: str, v: dict) -> str:
    """'pruned: +0.021 (95 % CI +0.015..+0.027), p = 0.003 vs base — better, beyond seed noise'."""
    if v.get("p") is None:
        return f"{name}: {v['diff']:+.4f} vs {base} — no test: train.seeds needs ≥ 2 seeds per version"
    said = {"better": "better, beyond seed noise", "worse": "worse, beyond seed noise"}.get(
        v["verdict"], "no significant change, within seed noise")
    return (f"{name}: {v['diff']:+.4f} (95 % CI {v['ci_low']:+.4f}..{v['ci_high']:+.4f}), "
            f"p = {v['p']:.3g} vs {base} — {said}")
