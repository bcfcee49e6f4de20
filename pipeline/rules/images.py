"""Image-property issue types (cleanvision's definitions), from the statistics `clean score`
writes to embeddings.npz in its decode pass (pipeline/scores/features.py::image_stats).

One ISSUES entry per property; each `<type>_score` is oriented so that higher = more severe.

| type | statistic | flagged when | kind |
|---|---|---|---|
| dark | 99th percentile of luminance p99 | p99 < flag.dark (0.37, cleanvision) | absolute |
| light | 5th percentile p05 | p05 > 1 − flag.light (0.05, cleanvision) | absolute |
| blurry | sharpness Σ Laplacian² / Σ gradient² | log below median − flag.blurry_mad·1.4826·MAD and within the set's lowest flag.property_fpr | relative |
| low_information | luminance entropy (bits) and range p99 − p05 | entropy < flag.low_information (3.0 bits; cleanvision 0.3 × 10) and p99 − p05 < 0.05, unless dark or light | absolute |
| odd_size | shorter side min(h, w) | outside [q1 − 3·IQR, q3 + 3·IQR] (cleanvision's fence) and ×/÷ flag.odd_size from the median | relative |
| odd_aspect_ratio | min(w/h, h/w) against the set's median shape | < flag.odd_aspect_ratio (0.5) | relative |
| grayscale | colour spread (mean max − min over channels) | ≤ 0.01 in a colour set (≥ half the images in colour) | absolute |

The blur statistic is the share of the edge energy at high frequency (Laplacian² over
gradient², both summed over the image): contrast cancels, so a dark or faded image is not
called blurry for its low contrast alone, and so does the amount of edge — the plain
Laplacian variance called every thin handwritten "1" blurry (14 of 1,797 clean digits), this
ratio calls none; a Gaussian blur of σ ≥ 1.5 px lowers it ~10 robust z below the set's bulk.
The cut also holds a stated rate: it never lies above the set's own flag.property_fpr
quantile, so at most that fraction of any set is called blurry (issues.json: `cut`,
`fence`, `quantile_cut`, `fpr_max`, `fraction_flagged`); images with no contrast at all (p99 − p05 < 0.02) are low-information, not
blurry. Entropy alone is not enough for low information: a sandal on a black background has
0.7–2 bits (1 % of Fashion-MNIST's training images are below 1.84 bits, 15 % below 3), so
an image must also span fewer than ~13 grey levels between its 5th and 99th percentiles; a
flat image that is dark or light is reported as that (every light image is flat: p05 > 0.95).
odd_size compares the shorter side, not cleanvision's √(h·w), so that a 28 × 84 image in a
28 × 28 set is an odd aspect ratio and not also an odd size. Blur and size are relative because their natural range depends on the resolution of
the set (a sharp 28 × 28 image has the Laplacian variance of a blurred photo).
"""
from __future__ import annotations

import numpy as np

from pipeline.errors import CleanError
from pipeline.registry import ISSUES
from pipeline.rules.base import IssueResult

#: below this contrast (p99 − p05) an image is flat: blur is undefined there
MIN_CONTRAST = 0.02
#: low_information: the most an image's range p99 − p05 may span (≈ 13 of 255 grey levels)
MAX_RANGE_LOW_INFO = 0.05
#: colour spread at or below which an image is grayscale (8-bit rounding and JPEG chroma noise)
GRAY_SPREAD = 0.01
#: cleanvision's IQR factor for odd sizes
IQR_FACTOR = 3.0


def _stat(feats: dict, key: str) -> np.ndarray:
    if key not in feats:
        raise CleanError(f"embeddings.npz has no '{key}' (written by an older `clean score`): re-run `clean score`")
    return np.asarray(feats[key], np.float64)[np.asarray(feats["train_pos"], np.int64)]


def _robust_z(x: np.ndarray) -> np.ndarray:
    """(x − median) / (1.4826·MAD) over the finite values (mean-absolute-deviation fallback; NaN stays NaN)."""
    ok = np.isfinite(x)
    z = np.full(x.shape, np.nan)
    if not ok.any():
        return z
    med = float(np.median(x[ok]))
    dev = np.abs(x[ok] - med)
    scale = 1.4826 * float(np.median(dev))
    if scale == 0:
        scale = 1.2533 * float(np.mean(dev))
    z[ok] = (x[ok] - med) / scale if scale > 0 else 0.0
    return z


def dark_issue(feats: dict, threshold: float = 0.37) -> IssueResult:
    p99 = _stat(feats, "brightness_p99")
    flagged = p99 < threshold
    return IssueResult(flagged, 1.0 - p99, f"99th percentile of brightness < {threshold:g}",
                       summary={"n_flagged": int(flagged.sum()), "threshold": float(threshold)})


def light_issue(feats: dict, threshold: float = 0.05) -> IssueResult:
    p05 = _stat(feats, "brightness_p05")
    flagged = 1.0 - p05 < threshold
    return IssueResult(flagged, p05, f"5th percentile of brightness > {1 - threshold:g}",
                       summary={"n_flagged": int(flagged.sum()), "threshold": float(threshold)})


def rate_capped_cut(x: np.ndarray, c: float, rate: float) -> tuple[float, dict]:
    """The cut of a relative check on statistic x [N] (low = defective; NaN ignored) → (cut, facts).

    cut = min(median − c · 1.4826 · MAD, the set's own `rate`-quantile): an image is flagged
    only when it lies far outside the set's bulk *and* among its `rate` lowest, so on any set
    — clean or not — at most ⌈rate · N⌉ images are flagged (the stated false-positive bound).
    """
    ok = x[np.isfinite(x)]
    if not len(ok):
        return -np.inf, {"cut": None, "fence": None, "quantile_cut": None, "fpr_max": float(rate)}
    med = float(np.median(ok))
    dev = np.abs(ok - med)
    scale = 1.4826 * float(np.median(dev)) or 1.2533 * float(np.mean(dev))
    fence = med - c * scale if scale > 0 else -np.inf
    # the rate-quantile as an order statistic: at most ceil(rate · N) values lie strictly below it
    kth = int(np.ceil(rate * len(ok)))
    qcut = float(np.partition(ok, kth)[kth]) if kth < len(ok) else np.inf
    cut = min(fence, qcut)
    return cut, {"cut": cut, "fence": fence, "quantile_cut": qcut, "fpr_max": float(rate)}


def blurry_issue(feats: dict, c: float = 5.0, rate: float = 0.01) -> IssueResult:
    """Blur = low log sharpness (Σ Laplacian² / Σ gradient², features.image_stats), far below
    the set's own (robust z < −c) and within its `rate` lowest (rate_capped_cut). Older
    embeddings.npz without `sharpness`: log(Laplacian variance / contrast²) instead."""
    contrast = _stat(feats, "brightness_p99") - _stat(feats, "brightness_p05")
    flat = contrast < MIN_CONTRAST
    if "sharpness" in feats:
        stat, name = _stat(feats, "sharpness"), "log(Σ Laplacian² / Σ |gradient|²)"
    else:
        stat = _stat(feats, "blur") / np.maximum(contrast, MIN_CONTRAST) ** 2
        name = "log(Laplacian variance / contrast²)"
    with np.errstate(divide="ignore", invalid="ignore"):
        sharp = np.where(flat, np.nan, np.log(np.maximum(stat, 1e-12)))
    cut, facts = rate_capped_cut(sharp, c, rate)
    flagged = np.isfinite(sharp) & (sharp < cut)
    z = _robust_z(sharp)
    rule = f"{name} < {cut:.4g} (robust z < −{c:g} and within the set's lowest {rate:.2%})"
    return IssueResult(flagged, -z, rule,
                       summary={"n_flagged": int(flagged.sum()), "c": float(c), "statistic": name, **facts,
                                "fraction_flagged": float(flagged.mean()) if len(flagged) else 0.0,
                                "n_flat_skipped": int(flat.sum())},
                       columns={"blurry_stat": sharp})


def low_information_issue(feats: dict, threshold: float = 3.0, dark: float = 0.37, light: float = 0.05) -> IssueResult:
    ent = _stat(feats, "entropy")
    rng_ = _stat(feats, "brightness_p99") - _stat(feats, "brightness_p05")
    p99, p05 = _stat(feats, "brightness_p99"), _stat(feats, "brightness_p05")
    dark_or_light = (p99 < dark) | (1.0 - p05 < light)
    flagged = (ent < threshold) & (rng_ < MAX_RANGE_LOW_INFO) & ~dark_or_light
    score = 1.0 - np.clip(rng_, 0, 1)  # higher = flatter
    return IssueResult(flagged, score, f"pixel entropy < {threshold:g} bits and p99 − p05 < {MAX_RANGE_LOW_INFO:g}",
                       summary={"n_flagged": int(flagged.sum()), "threshold": float(threshold)})


def odd_size_issue(feats: dict, ratio: float = 1.5) -> IssueResult:
    size = np.minimum(_stat(feats, "height"), _stat(feats, "width"))
    if not len(size):
        return IssueResult(np.zeros(0, bool), np.zeros(0), "odd size: no images")
    q1, med, q3 = np.percentile(size, [25, 50, 75])
    lo, hi = q1 - IQR_FACTOR * (q3 - q1), q3 + IQR_FACTOR * (q3 - q1)
    rel = np.abs(np.log(np.maximum(size, 1e-9) / med))
    flagged = ((size < lo) | (size > hi)) & (rel > np.log(ratio))
    return IssueResult(flagged, rel, f"shorter side outside [{lo:.3g}, {hi:.3g}] and ×/÷ {ratio:g} from the median {med:.3g}",
                       summary={"n_flagged": int(flagged.sum()), "median": float(med), "ratio": float(ratio)})


def odd_aspect_ratio_issue(feats: dict, threshold: float = 0.5) -> IssueResult:
    la = np.log(np.maximum(_stat(feats, "width"), 1) / np.maximum(_stat(feats, "height"), 1))
    med = float(np.median(la)) if len(la) else 0.0
    ratio = np.exp(-np.abs(la - med))  # min(a/a₀, a₀/a), in (0, 1]
    flagged = ratio < threshold
    return IssueResult(flagged, 1.0 - ratio,
                       f"min(a/a₀, a₀/a) < {threshold:g} (a = w/h, a₀ = the median {np.exp(med):.3g})",
                       summary={"n_flagged": int(flagged.sum()), "threshold": float(threshold)})


def grayscale_issue(feats: dict) -> IssueResult:
    spread = _stat(feats, "colour_spread")
    gray = spread <= GRAY_SPREAD
    colour_set = len(spread) > 0 and float(np.mean(~gray)) >= 0.5
    flagged = gray & colour_set
    rule = (f"colour spread ≤ {GRAY_SPREAD:g} in a colour set" if colour_set
            else "not a colour set (fewer than half the images in colour): nothing flagged")
    return IssueResult(flagged, 1.0 - np.clip(spread, 0, 1), rule,
                       summary={"n_flagged": int(flagged.sum()), "colour_set": bool(colour_set)})


# ---------------------------------------------------------------- the ISSUES entries: fn(inputs, cfg)
# Each entry reads embeddings.npz's statistics and its flag.* threshold; the *_issue functions
# above are the math on a features mapping (tests call them directly).

@ISSUES.register("dark", needs=("embeddings",), doc="99th percentile of brightness below flag.dark (cleanvision)")
def dark(inputs, cfg) -> IssueResult:
    return dark_issue(inputs.features(), cfg.dark)


@ISSUES.register("light", needs=("embeddings",), doc="5th percentile of brightness above 1 − flag.light (cleanvision)")
def light(inputs, cfg) -> IssueResult:
    return light_issue(inputs.features(), cfg.light)


@ISSUES.register("blurry", needs=("embeddings",),
                 doc="Laplacian-to-gradient energy far below the set's own (robust z < −flag.blurry_mad) and within "
                     "its lowest flag.property_fpr")
def blurry(inputs, cfg) -> IssueResult:
    return blurry_issue(inputs.features(), cfg.blurry_mad, cfg.property_fpr)


@ISSUES.register("low_information", needs=("embeddings",),
                 doc="pixel entropy below flag.low_information bits (blank, near-constant images)")
def low_information(inputs, cfg) -> IssueResult:
    return low_information_issue(inputs.features(), cfg.low_information, cfg.dark, cfg.light)


@ISSUES.register("odd_size", needs=("embeddings",),
                 doc="shorter side outside the 3·IQR fence and ×/÷ flag.odd_size from the median (cleanvision)")
def odd_size(inputs, cfg) -> IssueResult:
    return odd_size_issue(inputs.features(), cfg.odd_size)


@ISSUES.register("odd_aspect_ratio", needs=("embeddings",),
                 doc="aspect ratio off the set's median shape by more than a factor 1/flag.odd_aspect_ratio")
def odd_aspect_ratio(inputs, cfg) -> IssueResult:
    return odd_aspect_ratio_issue(inputs.features(), cfg.odd_aspect_ratio)


@ISSUES.register("grayscale", needs=("embeddings",), doc="a grayscale image in a colour set (never in a 1-channel set)")
def grayscale(inputs, cfg) -> IssueResult:
    return grayscale_issue(inputs.features())
