"""params.yaml: every knob of every stage, with defaults, validated on load.

`load_params(path)` merges the user's file over DEFAULTS and checks every key, type and
allowed value, raising :class:`CleanError` with the key, the bad value and the fix.
"""
from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from pipeline.checks import input_file
from pipeline.errors import CleanError
from pipeline.registry import ISSUES, RULES, SCORES, SOURCES, STRATEGIES, Registry

#: the label rule of flag.filter_by / heldout_filter_by that is clean's own (pipeline/rules/confident.py: noise_posterior)
NOISE_POSTERIOR = "noise_posterior"
#: flag.filter_by / heldout_filter_by values: cleanlab.filter.find_label_issues' own, and NOISE_POSTERIOR (kept
#: here, not in pipeline/rules/confident.py, so that reading params.yaml imports no rule module)
CONFIDENT_FILTERS = (
    "prune_by_noise_rate",
    "prune_by_class",
    "both",
    "confident_learning",
    "predicted_neq_given",
    "low_normalized_margin",
    "low_self_confidence",
    NOISE_POSTERIOR,
)


DEFAULTS: dict[str, Any] = {
    "data": {
        "source": "digits",   # a data source (registry: pipeline/data/sources.py)
        "root": None,         # folder / CSV / IDX folder; null = the source's default
        "classes": None,      # optional fixed class list; other labels go to problems.csv
        "val_frac": 0.1,      # of the training part
        "test_frac": 0.2,     # ignored when the source has an official test split
        "image_size": None,   # null = native size; int or [H, W] resizes
        "seed": 0,
        "cache_max_gb": 4.0,  # decoded images beyond this many GiB are streamed from disk (per process)
    },
    "noise": {
        "rate": 0.0,          # fraction of training labels to corrupt (experiments)
        "kind": "symmetric",  # symmetric | pairs
        "pairs": None,        # {class_index: class_index} for kind=pairs; null = c -> c+1
        "seed": 0,
        "splits": ["train"],  # splits whose labels get noise (a user's val and test are noisy too)
    },
    "model": {
        "name": "small_cnn",  # any timm model, or small_cnn / small_cnn_bn
        "pretrained": False,  # timm pretrained weights (needs a download or a local file)
        "weights": None,      # local weights file for pretrained (no download)
    },
    "train": {
        "epochs": 15,
        "batch_size": 64,
        "optimizer": "adam",  # sgd | adam | adamw
        "lr": 0.001,
        "momentum": 0.9,      # sgd only
        "weight_decay": 0.0,
        "schedule": "cosine", # constant | cosine | step
        "step_size": 10,      # epochs between lr drops (schedule=step)
        "gamma": 0.1,         # lr factor per drop (schedule=step)
        "seeds": [0, 1, 2],   # one run per seed (mean ± std); the first is the model that gets scored
        "device": "auto",     # auto | cpu | cuda
        "checkpoint_every": 3,  # epochs between checkpoints (self- and val-influence sum over them)
        "track": 256,
        "probs_window": 0.4,  # the first fraction of epochs whose pre-update softmax is averaged (label issues)         # random training samples whose gradient norm is recorded each epoch
        "amp": "auto",        # auto | off | bf16 | fp16: mixed precision (auto: bf16/fp16 on CUDA, off on CPU)
        "workers": 4,         # DataLoader processes decoding streamed images (0 = in the main process)
        "augment": "auto",    # auto | none | flip-crop: timm's random resized crop + flip on training batches (auto: 3-channel images ≥ 64 px)
    },
    "score": {
        "norm": "l2",         # l1 | l2 | linf: the norm of each sample's gradient
        "params": "all",      # last | weights | biases | all: which parameters' gradient
        "batch_size": 256,
        "split": "train",     # train | val | test | all
        "self_influence": True,  # TracIn over the epoch checkpoints (one pass per checkpoint)
        "val_influence": True,   # TracIn train→validation over the checkpoints (needs a val split: data.val_frac > 0)
        "embeddings": True,   # scores/embeddings.npz: every split's penultimate features + image stats (flag's checks)
        "seed_embeddings": True,  # embeddings.npz also holds the other seed models' embeddings (the outlier check averages over them)
        "importance": True,   # predicted change of the mean val loss when each image is removed (TRAK over the seeds' models)
        "importance_dim": 1024,  # count-sketch size k of the per-sample gradients (importance)
    },
    "flag": {
        "method": "confident-dynamics",  # the label rule that drives `flagged` (registry: pipeline/rules/)
        "issues": None,       # issue types to check (registry ISSUES); null = every registered type
        "filter_by": NOISE_POSTERIOR,  # confident-dynamics: noise_posterior (§2.4) or a cleanlab find_label_issues filter_by
        "heldout_filter_by": NOISE_POSTERIOR,  # val/test label issues: the same choices, on the base models' softmax
        "aum_max": -0.5,      # confident-dynamics: a label issue also has AUM below this (null = no AUM condition)
        "label_min_p": 0.0,   # confident-dynamics and val/test label issues only where p̄ of the suggestion is at least this (0 = off)
        "score": "aum",       # score column for the threshold rules (registry: pipeline/scores/)
        "quantile": 0.05,     # quantile: flag the top q
        "threshold": 3.5,     # mad: robust z above this
        "contamination": 0.05,  # isolation-forest
        "projection_dim": 256,  # isolation-forest: random projection of last-layer gradients
        "folds": 4,           # confident: k-fold cross-fitting (k trainings)
        "seed": 0,
        "grid": 36,           # images in the top-flagged grid (0 = none)
        "duplicate_tau": 0.13,  # duplicate: near copy when cosine distance < tau x median nearest-neighbour distance
        "copy_ratio": 0.1,    # duplicate: aligned pixel distance <= this x the pair's ordinary-neighbour distance
        "outlier_k": 10,      # outlier (and duplicate search): nearest training embeddings
        "outlier_mad": 6.0,   # outlier: robust z of the kNN distance above this (no val split)
        "outlier_fpr": 0.01,  # outlier: beyond the (1 - this) quantile of the val images' kNN distance
        "dark": 0.37,         # dark: 99th brightness percentile below this (cleanvision)
        "light": 0.05,        # light: 5th brightness percentile above 1 - this (cleanvision)
        "blurry_mad": 5.0,    # blurry: robust z of log(Laplacian^2 / gradient^2 energy) below minus this
        "property_fpr": 0.01,  # blurry: at most this fraction of the set flagged (cut ≤ the set's own quantile)
        "low_information": 3.0,  # low_information: pixel entropy below this many bits
        "odd_size": 1.5,      # odd_size: sqrt(h*w) outside the 3 IQR fence and this factor from the median
        "odd_aspect_ratio": 0.5,  # odd_aspect_ratio: min(a/a0, a0/a) below this (a0 = the median w/h)
    },
    "prune": {
        "strategy": "drop-flagged-gated",  # a prune strategy (registry: pipeline/strategies.py)
        "drop": ["label"],    # drop-flagged(-gated): the issue types it drops (flags.csv is_<type>)
        "relabel_min_p": 0.5,  # relabel-or-drop: relabel a label issue when p̄ of its suggestion is at least this
        "by": "grad_norm",    # any score column: max-gradient / non-extreme rank by it, gradient-cdf samples ∝ it
        "keep": 0.8,          # fraction of the training set to keep (not drop-flagged)
        "skip": 0.05,         # non-extreme: top fraction skipped
        "balanced": False,    # select per class in proportion to its size
        "seed": 0,
    },
    "sweep": {
        "strategies": ["random", "max-gradient", "non-extreme", "gradient-cdf"],
        "keeps": [],          # empty = no sweep (opt-in): dvc exp run -S 'sweep.keeps=[0.1,0.5]'
    },
}

class _Choices(dict):
    """key → list of allowed values; a registry's names are read when asked for (the registries
    import their modules on first use, and those modules may import this one)."""

    def __getitem__(self, key: str) -> list:
        value = super().__getitem__(key)
        return value.names() if isinstance(value, Registry) else value


#: Allowed values of every key with a fixed set; the registries supply scores, rules, strategies, sources.
CHOICES = _Choices({
    "data.source": SOURCES,
    "noise.kind": ["symmetric", "pairs"],
    "train.optimizer": ["sgd", "adam", "adamw"],
    "train.schedule": ["constant", "cosine", "step"],
    "train.device": ["auto", "cpu", "cuda"],
    "train.amp": ["auto", "off", "bf16", "fp16"],
    "train.augment": ["auto", "none", "flip-crop"],
    "score.norm": ["l1", "l2", "linf"],
    "score.params": ["last", "weights", "biases", "all"],
    "score.split": ["train", "val", "test", "all"],
    "flag.method": RULES,
    "flag.score": SCORES,
    "prune.strategy": STRATEGIES,
    "prune.by": SCORES,
    "flag.filter_by": CONFIDENT_FILTERS,
    "flag.heldout_filter_by": CONFIDENT_FILTERS,
})


#: the largest seed numpy's legacy generator accepts (2**32 - 1); every seed param is ≤ it
SEED_MAX = 2**32 - 1


def _intervals(table: str) -> dict:
    """'key [lo, hi)' lines → {key: (lo, hi, lo_inclusive, hi_inclusive)}; ±inf → None; '2**32-1' → SEED_MAX."""
    def num(t: str):
        t = t.strip()
        if t in ("inf", "-inf"):
            return None
        if t == "2**32-1":
            return SEED_MAX
        return float(t) if "." in t else int(t)

    out = {}
    for line in table.strip().splitlines():
        key, rng = line.split(None, 1)
        lo, hi = rng.strip()[1:-1].split(",")
        out[key] = (num(lo), num(hi), rng.strip()[0] == "[", rng.strip()[-1] == "]")
    return out

#: Numeric ranges, in interval notation ("[" / "]" inclusive, "(" / ")" exclusive); every seed feeds
#: numpy / torch generators, which take 0 .. 2**32 − 1. Every count has an upper bound the machine
#: can hold (arrays of that many epochs, neighbours, folds, tiles), far above any useful value. Parsed into (low, high, low_inclusive, high_inclusive).
RANGES = _intervals("""
data.val_frac            [0.0, 1.0)
data.test_frac           [0.0, 1.0)
noise.rate               [0.0, 1.0)
train.epochs             [1, 100000]
train.batch_size         [1, 1048576]
train.lr                 (0.0, inf)
train.momentum           [0.0, 1.0)
train.weight_decay       [0.0, inf)
train.step_size          [1, 100000]
train.gamma              (0.0, 1.0]
train.checkpoint_every   [1, 100000]
train.track              [0, 10000000]
train.probs_window       (0.0, 1.0]
train.workers            [0, 1024]
data.cache_max_gb        [0.0, 1000000.0]
score.batch_size         [1, 1048576]
score.importance_dim     [8, 65536]
flag.quantile            (0.0, 1.0)
flag.threshold           (0.0, inf)
flag.contamination       (0.0, 0.5]
flag.projection_dim      [1, 65536]
flag.folds               [2, 1000]
flag.grid                [0, 10000]
flag.duplicate_tau       (0.0, inf)
flag.copy_ratio          [0.0, 100.0]
flag.outlier_k           [1, 10000]
flag.outlier_mad         (0.0, inf)
flag.outlier_fpr         (0.0, 1.0)
flag.dark                [0.0, 1.0]
flag.light               [0.0, 1.0]
flag.blurry_mad          (0.0, inf)
flag.property_fpr        (0.0, 1.0)
flag.low_information     [0.0, 8.0]
flag.odd_size            (1.0, inf)
flag.odd_aspect_ratio    [0.0, 1.0]
flag.label_min_p         [0.0, 1.0]
prune.keep               (0.0, 1.0]
prune.relabel_min_p      [0.0, 1.0]
prune.skip               [0.0, 1.0)
data.seed                [0, 2**32-1]
noise.seed               [0, 2**32-1]
flag.seed                [0, 2**32-1]
prune.seed               [0, 2**32-1]
""")

# keys whose value may be of several shapes (checked by their own validator)
FREE = {"flag.aum_max", "flag.issues", "prune.drop", "data.root", "data.classes", "data.image_size", "noise.pairs", "noise.splits", "model.weights", "train.seeds",
        "sweep.strategies", "sweep.keeps"}


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in FREE:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _check_value(key: str, value: Any, default: Any, where: str) -> Any:
    if key in CHOICES:
        if value not in CHOICES[key]:
            raise CleanError(
                f"{where}: {key} = {_short(value)} is not allowed; use one of: {', '.join(CHOICES[key])}"
            )
        return value
    if key in FREE:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise CleanError(f"{where}: {key} must be true or false, got {_short(value)}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise CleanError(f"{where}: {key} must be an integer, got {_short(value)}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CleanError(f"{where}: {key} must be a number, got {_short(value)}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise CleanError(f"{where}: {key} must be a finite number, got {_short(value)}")
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise CleanError(f"{where}: {key} must be a string, got {_short(value)}")
    elif isinstance(default, list):
        if not isinstance(value, list):
            raise CleanError(f"{where}: {key} must be a list, got {_short(value)}")
    if key in RANGES:
        lo, hi, lo_inc, hi_inc = RANGES[key]
        bad = (lo is not None and (value < lo or (value == lo and not lo_inc))) or (
            hi is not None and (value > hi or (value == hi and not hi_inc))
        )
        if bad:
            lo_s = "" if lo is None else f"{'≥' if lo_inc else '>'} {lo}"
            hi_s = "" if hi is None else f"{'≤' if hi_inc else '<'} {hi}"
            rng = " and ".join(s for s in (lo_s, hi_s) if s)
            raise CleanError(f"{where}: {key} must be {rng}, got {_short(value)}")
    return value


def validate(params: dict, where: str = "params.yaml") -> dict:
    """Merge `params` over DEFAULTS and validate every key; return the full nested dict."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise CleanError(f"{where}: expected a mapping of sections (data, model, train, ...), got {type(params).__name__}")
    merged = copy.deepcopy(DEFAULTS)
    known = _flat(DEFAULTS)
    for section, body in params.items():
        if section not in DEFAULTS:
            hint = difflib.get_close_matches(str(section), list(DEFAULTS), n=1)
            extra = f"; did you mean '{hint[0]}'?" if hint else f"; known sections: {', '.join(DEFAULTS)}"
            raise CleanError(f"{where}: unknown section '{section}'{extra}")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise CleanError(f"{where}: section '{section}' must be a mapping of keys, got {_short(body)}")
        for k, v in body.items():
            key = f"{section}.{k}"
            if key not in known:
                names = [n for n in known if n.startswith(section + ".")]
                hint = difflib.get_close_matches(key, names, n=1)
                extra = f"; did you mean '{hint[0]}'?" if hint else f"; known keys: {', '.join(names)}"
                raise CleanError(f"{where}: unknown key '{key}'{extra}")
            merged[section][k] = _check_value(key, v, known[key], where)
    _check_free(merged, where)
    return merged


def _check_free(p: dict, where: str) -> None:
    size = p["data"]["image_size"]
    if size is not None:
        ok = (isinstance(size, int) and not isinstance(size, bool) and size > 0) or (
            isinstance(size, list) and len(size) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
        )
        if not ok:
            raise CleanError(f"{where}: data.image_size must be null, a positive integer or [H, W], got {_short(size)}")
    classes = p["data"]["classes"]
    if classes is not None and (not isinstance(classes, list) or not classes
                                or len(set(map(str, classes))) != len(classes)):
        raise CleanError(f"{where}: data.classes must be null or a non-empty list of distinct names, got {_short(classes)}")
    if classes is not None and len(classes) < 2:
        raise CleanError(f"{where}: data.classes lists {len(classes)} class ({_short(classes)}); a classifier needs at "
                         "least 2: list every class to keep, or null for every class of the source")
    if p["data"]["val_frac"] + p["data"]["test_frac"] >= 1:
        raise CleanError(f"{where}: data.val_frac + data.test_frac must be < 1, got "
                         f"{p['data']['val_frac']} + {p['data']['test_frac']}")
    root = p["data"]["root"]
    if root is not None and not isinstance(root, str):
        raise CleanError(f"{where}: data.root must be null or a path string, got {_short(root)}")
    if "root" in SOURCES[p["data"]["source"]].needs and root is None:
        raise CleanError(f"{where}: data.source = {p['data']['source']} needs data.root "
                         f"(the {'image folder' if p['data']['source'] == 'imagefolder' else 'CSV file'})")
    pairs = p["noise"]["pairs"]
    if pairs is not None and (not isinstance(pairs, dict) or not all(
            isinstance(a, int) and isinstance(b, int) for a, b in pairs.items())):
        raise CleanError(f"{where}: noise.pairs must be null or a mapping {{class_index: class_index}}, got {_short(pairs)}")
    splits = p["noise"]["splits"]
    if not (isinstance(splits, list) and splits and all(s in ("train", "val", "test") for s in splits)):
        raise CleanError(f"{where}: noise.splits must be a non-empty list from: train, val, test; got {_short(splits)}")
    seeds = p["train"]["seeds"]
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                      for s in seeds) and len(set(seeds)) == len(seeds)):
        raise CleanError(f"{where}: train.seeds must be a non-empty list of distinct integers ≥ 0, got {_short(seeds)}")
    if max(seeds) > SEED_MAX:
        raise CleanError(f"{where}: train.seeds: seed {max(seeds)} is too large; seeds must be integers from 0 to "
                         f"{SEED_MAX} (2**32 - 1)")
    strategies = p["sweep"]["strategies"]
    if not (isinstance(strategies, list) and strategies and all(s in STRATEGIES for s in strategies)):
        raise CleanError(f"{where}: sweep.strategies must be a non-empty list from: {', '.join(STRATEGIES.names())}; "
                         f"got {_short(strategies)}")
    keeps = p["sweep"]["keeps"]
    if not (isinstance(keeps, list) and all(
            isinstance(k, (int, float)) and not isinstance(k, bool) and 0 < k <= 1 for k in keeps)):
        raise CleanError(f"{where}: sweep.keeps must be a list of fractions in (0, 1] (empty: no sweep), got {_short(keeps)}")
    aum_max = p["flag"]["aum_max"]
    if aum_max is not None and (isinstance(aum_max, bool) or not isinstance(aum_max, (int, float))):
        raise CleanError(f"{where}: flag.aum_max must be null or a number, got {_short(aum_max)}")
    for key, value in (("flag.issues", p["flag"]["issues"]), ("prune.drop", p["prune"]["drop"])):
        if value is None and key == "flag.issues":
            continue
        if not (isinstance(value, list) and all(isinstance(t, str) and t in ISSUES for t in value)):
            raise CleanError(f"{where}: {key} must be a list of issue types from: {', '.join(ISSUES)}; got {_short(value)}")
    w = p["model"]["weights"]
    if w is not None and not isinstance(w, str):
        raise CleanError(f"{where}: model.weights must be null or a path string, got {_short(w)}")


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads YAML 1.2 floats: `1e-3`, `5E+4` (YAML 1.1, and with it
    PyYAML, wants a dot: `1.0e-3`; without this `lr: 1e-3` would be the string '1e-3')."""


def _bounded_int(loader, node):
    digits = sum(ch.isdigit() for ch in node.value)
    if digits > MAX_DIGITS:
        raise CleanError(f"{getattr(loader, 'where', 'params.yaml')} line {node.start_mark.line + 1}: a number of {digits:,} digits; no setting takes "
                         f"more than {MAX_DIGITS} (seeds take 10): write a smaller value")
    return yaml.SafeLoader.construct_yaml_int(loader, node)


_Loader.add_constructor("tag:yaml.org,2002:int", _bounded_int)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


#: the most values a params.yaml may expand to (anchors/aliases counted at every use): a few hundred are used
MAX_VALUES = 100_000
#: the largest params.yaml read (bytes)
MAX_BYTES = 2 ** 20
#: the most digits of an integer in params.yaml (seeds take 10)
MAX_DIGITS = 30


def _short(value, width: int = 80) -> str:
    """repr(value), cut to `width` characters (an expanded YAML value can be gigabytes)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxtuple, r.maxset = 2, 6, 6, 6, 6
    r.maxstring = r.maxother = r.maxlong = width
    try:
        text = r.repr(value)
    except ValueError:  # an int too long for str()
        text = f"<an integer of {int(value.bit_length() * 0.30103):,} digits>"
    return text if len(text) <= width else text[:width - 3] + "..."


def _expanded(node, memo: dict) -> int:
    """How many values `node` stands for once every alias is expanded (memoised: a shared node is
    counted at each use without being walked again)."""
    key = id(node)
    if key not in memo:
        if isinstance(node, yaml.MappingNode):
            memo[key] = 1 + sum(_expanded(k, memo) + _expanded(v, memo) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            memo[key] = 1 + sum(_expanded(v, memo) for v in node.value)
        else:
            memo[key] = 1
    return memo[key]


def _yaml(text: str, where: str = "params.yaml"):
    """Parse YAML text with the safe loader (+ YAML 1.2 floats), bounded: at most MAX_VALUES values
    after alias expansion ("billion laughs"), integers of at most MAX_DIGITS digits."""
    loader = _Loader(text)
    loader.where = where
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        n = _expanded(node, {})
        if n > MAX_VALUES:
            raise CleanError(f"{where}: the YAML expands to more than {MAX_VALUES:,} values ({n:.3g}) through "
                             "anchors and aliases (&name / *name) used inside each other; params.yaml holds a few "
                             "hundred settings: write the values out")
        return loader.construct_document(node)
    except RecursionError:
        raise CleanError(f"{where}: the YAML is nested too deeply; params.yaml is two levels (section: key: value)") from None
    finally:
        loader.dispose()


def load_params(path: str | Path = "params.yaml") -> dict:
    """Read `path` (YAML, safe loader) and return validated params; DEFAULTS if it is absent."""
    path = Path(path)
    st = input_file(path, "--params needs a params.yaml file")
    if st is None:
        return validate({}, where=str(path))
    if st.st_size > MAX_BYTES:
        raise CleanError(f"{path}: {st.st_size:,} bytes; a params.yaml is a few KiB (at most {MAX_BYTES:,} bytes)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CleanError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start}); "
                         "params.yaml must be YAML text") from None
    except OSError as e:
        raise CleanError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        raw = _yaml(text, str(path))
    except yaml.YAMLError as e:
        raise CleanError(f"{path}: not valid YAML ({e.__class__.__name__}: {str(e).splitlines()[0]}); fix the syntax") from None
    return validate(raw, where=str(path))


def override(params: dict, **flat: Any) -> dict:
    """Return params with CLI overrides applied: keys like `train__epochs` (None = keep)."""
    raw = copy.deepcopy(params)
    for k, v in flat.items():
        if v is None:
            continue
        section, key = k.split("__", 1)
        raw[section][key] = v
    return validate(raw, where="command-line options")
