"""Is a dataset version better than another beyond seed noise? Welch's t-test on the per-seed
test accuracies of the two versions (docs/methods.md §5.4)."""
from __future__ import annotations

import math

import numpy as np

#: two-sided significance level of the verdict
ALPHA = 0.05


def compare_runs(new, base, alpha: float = ALPHA) -> dict:
    """Welch's t-test of per-seed accuracies `new` [n1] against `base` [n2] → flat dict:

    diff = mean(new) − mean(base); diff_ci_low / diff_ci_high: its 95 % confidence interval
    (Welch–Satterthwaite degrees of freedom); p_value: two-sided; verdict: "better" /
    "worse" (p < alpha) or "no significant change". With fewer than 2 seeds on either side
    there is no test: p_value and the interval are None and the verdict says so.
    """
    from scipy import stats

    a, b = np.asarray(new, np.float64), np.asarray(base, np.float64)
    diff = float(a.mean() - b.mean())
    out = {"diff": round(diff, 6), "diff_ci_low": None, "diff_ci_high": None, "p_value": None}
    if len(a) < 2 or len(b) < 2:
        out["verdict"] = f"no test: {min(len(a), len(b))} seed(s) (train.seeds needs ≥ 2 per version)"
        return out
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0.0:
        p, half = (1.0 if diff == 0 else 0.0), 0.0
    else:
        dof = (va + vb) ** 2 / ((va ** 2 / (len(a) - 1) if va else 0.0) + (vb ** 2 / (len(b) - 1) if vb else 0.0))
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
        half = float(stats.t.ppf(1 - alpha / 2, dof)) * se
    out.update({"diff_ci_low": round(diff - half, 6), "diff_ci_high": round(diff + half, 6), "p_value": round(p, 6)})
    out["verdict"] = ("better" if diff > 0 else "worse") if p < alpha else "no significant change"
    return out


def sentence(name: str, base: str, v: dict) -> str:
    """'pruned: +0.021 (95 % CI +0.015..+0.027), p = 0.003 vs base — beyond seed noise'."""
    if v.get("p_value") is None:
        return f"{name}: {v['diff']:+.4f} vs {base} — {v['verdict']}"
    noise = "beyond seed noise" if v["verdict"] in ("better", "worse") else "within seed noise"
    return (f"{name}: {v['diff']:+.4f} (95 % CI {v['diff_ci_low']:+.4f}..{v['diff_ci_high']:+.4f}), "
            f"p = {v['p_value']:.3g} vs {base} — {v['verdict']}, {noise}")
