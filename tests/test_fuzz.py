"""Fuzz the validation entry points through the CLI: generated params.yaml files and manifests.

Every case either runs or fails with one clean message: exit code 0 or 2, no traceback, and the
only exception Typer sees is SystemExit (CLEAN_DEBUG=1, so a bug surfaces as its own exception).
Cases stay cheap: params go to `clean prune` (fast whatever its knobs) and to `clean train` with
a missing manifest (validation happens before any training); manifests go to `clean prune` and to
`clean train --epochs 1` on a 30-image dataset. 120 + 120 generated cases, fixed seed.
"""
from __future__ import annotations

import csv
import io
import traceback
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cli.main import app
from pipeline.params import CHOICES, DEFAULTS, RANGES

from .helpers import TINY_PARAMS, cwd, make_imagefolder

runner = CliRunner()
SETTINGS = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

PARAMS = TINY_PARAMS.replace("  seeds: [0]\n", "  seeds: [0]\n  track: 8\n")


def invoke(where: Path, *args):
    with cwd(where):
        return runner.invoke(app, [str(a) for a in args], env={"CLEAN_DEBUG": "1"})


def assert_clean(res, case: str) -> None:
    """Ran (0) or failed with exactly one `error:` line (2); never a traceback or another exception."""
    exc = res.exception
    detail = "".join(traceback.format_exception(exc)) if exc is not None and not isinstance(exc, SystemExit) else ""
    assert exc is None or isinstance(exc, SystemExit), f"{case}\n{res.output}\n{detail}"
    assert res.exit_code in (0, 2), f"{case}\n{res.output}"
    assert "Traceback" not in res.output, f"{case}\n{res.output}"
    if res.exit_code == 2:
        assert " ".join(res.output.split()).count("error:") == 1, f"{case}\n{res.output}"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    make_imagefolder(root / "data/imgs", n_per_class=10)
    (root / "params.yaml").write_text(PARAMS)
    for cmd in (["prepare"], ["train"], ["score"], ["flag"]):
        res = invoke(root, *cmd)
        assert res.exit_code == 0, res.output
    (root / "data/imgs/broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (root / "out").mkdir()
    return root


# --------------------------------------------------------------------------- params.yaml

SECTIONS = list(DEFAULTS)
KEYS = {s: list(DEFAULTS[s]) for s in SECTIONS}

junk = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.one_of(st.integers(-3, 12), st.text(max_size=3), st.floats(-2, 2)), max_size=4),
    st.dictionaries(st.one_of(st.integers(-2, 12), st.text(max_size=4)), st.one_of(st.integers(-2, 12), st.text(max_size=4)),
                    max_size=3),
)


def plausible(key: str, default):
    """Values near the valid domain of `key` (in and just outside its choices and bounds)."""
    if key in CHOICES:
        return st.sampled_from(CHOICES[key] + [CHOICES[key][0].upper(), ""])
    if key in RANGES:
        lo, hi, _, _ = RANGES[key]
        edges = [v for v in (lo, hi) if v is not None]
        if isinstance(default, int) and not isinstance(default, bool):
            return st.one_of(st.sampled_from([e + d for e in edges for d in (-1, 0, 1)]),
                             st.integers(int(lo) - 2, int(hi if hi is not None else lo + 40)))
        return st.one_of(st.sampled_from(edges), st.floats(lo - 0.5, (hi if hi is not None else lo + 2) + 0.5))
    if isinstance(default, bool):
        return st.booleans()
    if key == "train.seeds":
        return st.lists(st.integers(-1, 4), max_size=3)
    if key == "sweep.keeps":
        return st.lists(st.floats(-0.5, 1.5), max_size=3)
    if key == "sweep.strategies":
        return st.lists(st.sampled_from(CHOICES["prune.strategy"] + ["best"]), max_size=3)
    if key == "data.image_size":
        return st.one_of(st.none(), st.integers(-1, 9), st.lists(st.integers(-1, 9), max_size=3))
    if key == "data.classes":
        return st.one_of(st.none(), st.lists(st.sampled_from(["a", "b", "c", "d", 1]), max_size=4))
    if key == "noise.pairs":
        return st.one_of(st.none(), st.dictionaries(st.integers(-1, 4), st.integers(-1, 4), max_size=2))
    return st.one_of(st.none(), st.text(max_size=8))


@st.composite
def params_docs(draw):
    doc = {}
    section_names = st.one_of(*[st.sampled_from(SECTIONS)] * 6, st.sampled_from(["trian", "extra"]))
    for section in draw(st.lists(section_names, unique=True, max_size=4)):
        if section not in KEYS or draw(st.integers(0, 12)) == 0:
            doc[section] = draw(st.one_of(junk, st.dictionaries(st.text(max_size=5), junk, max_size=2)))
            continue
        body = {}
        names = st.one_of(*[st.sampled_from(KEYS[section])] * 9, st.sampled_from(["bogus", "epoch"]))
        for k in draw(st.lists(names, unique=True, max_size=4)):
            key = f"{section}.{k}"
            default = DEFAULTS[section].get(k)
            body[k] = draw(plausible(key, default) if k in KEYS[section] and draw(st.integers(0, 5)) else junk)
        doc[section] = body
    return doc


@st.composite
def params_files(draw) -> bytes:
    kind = draw(st.integers(0, 19))
    if kind == 0:
        return draw(st.binary(max_size=40))
    if kind == 1:
        return draw(st.text(max_size=40)).encode("utf-8", "surrogatepass")
    text = yaml.safe_dump(draw(params_docs()), allow_unicode=True)
    if kind == 2:  # break the YAML somewhere
        cut = draw(st.integers(0, max(len(text) - 1, 0)))
        text = text[:cut] + draw(st.sampled_from(["[", "{", ": :", "\t", "'", "!!python/object:os.system x"])) + text[cut:]
    return text.encode("utf-8", "surrogatepass")


@SETTINGS
@given(raw=params_files())
def test_fuzzed_params_run_or_fail_cleanly(project, raw):
    f = project / "out/fuzz.yaml"
    f.write_bytes(raw)
    case = f"params.yaml = {raw[:400]!r}"
    # prune: cheap for every valid knob; validation failures stop it before reading anything
    res = invoke(project, "prune", "--params", f, "--out", project / "out/pruned.csv",
                 "--summary", project / "out/summary.json")
    assert_clean(res, case)
    # train: the whole params file is validated and the recipe built before the manifest is read
    res = invoke(project, "train", "--params", f, "--manifest", project / "out/none.csv", "--out", project / "out/m")
    assert_clean(res, case)
    assert res.exit_code == 2


# --------------------------------------------------------------------------- manifests

def base_rows(project: Path) -> tuple[list[str], list[list[str]]]:
    with open(project / "data/manifest.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


cell = st.one_of(
    st.sampled_from(["", " ", "0", "-1", "1", "2", "3", "99", "2.5", "1e3", "nan", "inf", "-inf", "NaN", "None",
                     "train", "val", "test", "TRAIN", "imgs/a/000.png", "imgs/broken.png", "imgs", "nope.png",
                     "/etc/passwd", "imgs/a/000.png#3", "a,b", '"q"', "x\ny", "é", "9" * 30, "\x00"]),
    st.text(max_size=6),
    st.integers(-5, 40).map(str),
)


@st.composite
def manifests(draw, header: list[str], rows: list[list[str]]) -> bytes:
    header, rows = list(header), [list(r) for r in rows]
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["cell", "cell", "cell", "drop_col", "rename_col", "extra_col", "dup_row",
                                   "del_rows", "shuffle", "truncate_rows"]))
        if op == "cell" and rows:
            r = draw(st.integers(0, len(rows) - 1))
            if rows[r]:
                rows[r][draw(st.integers(0, len(rows[r]) - 1))] = draw(cell)
        elif op == "drop_col" and header:
            c = draw(st.integers(0, len(header) - 1))
            header.pop(c)
            for r in rows:
                if c < len(r):
                    r.pop(c)
        elif op == "rename_col" and header:
            header[draw(st.integers(0, len(header) - 1))] = draw(st.sampled_from(["ID", "label ", "splits", "", "path"]))
        elif op == "extra_col":
            header.append(draw(st.sampled_from(["noisy", "orig_label", "note", "id"])))
            for r in rows:
                r.append(draw(cell))
        elif op == "dup_row" and rows:
            rows.append(list(rows[draw(st.integers(0, len(rows) - 1))]))
        elif op == "del_rows" and rows:
            keep = draw(st.lists(st.booleans(), min_size=len(rows), max_size=len(rows)))
            rows = [r for r, k in zip(rows, keep) if k]
        elif op == "shuffle":
            rows = draw(st.permutations(rows))
        elif op == "truncate_rows" and rows:
            r = draw(st.integers(0, len(rows) - 1))
            rows[r] = rows[r][: draw(st.integers(0, len(rows[r])))]
    buf = io.StringIO()
    csv.writer(buf, lineterminator=draw(st.sampled_from(["\n", "\r\n"]))).writerows([header] + rows)
    data = buf.getvalue().encode("utf-8")
    raw = draw(st.integers(0, 9))
    if raw == 0:
        data = data[: draw(st.integers(0, len(data)))]  # cut mid-file
    elif raw == 1:
        data = b"\xef\xbb\xbf" + data  # BOM
    elif raw == 2:
        data = draw(st.binary(max_size=60))
    return data


@pytest.fixture(scope="module")
def base_manifest(project):
    return base_rows(project)


def test_fuzzed_manifests_run_or_fail_cleanly(project, base_manifest):
    header, rows = base_manifest
    n_ok = {"prune": 0, "train": 0}

    @SETTINGS
    @given(data=manifests(header, rows))
    def check(data):
        f = project / "data/fuzz.csv"  # next to data/classes.json; relative image paths resolve
        f.write_bytes(data)
        case = f"manifest = {data[:600]!r}"
        res = invoke(project, "prune", "--manifest", f, "--strategy", "random", "--out", project / "out/pruned.csv",
                     "--summary", project / "out/summary.json")
        assert_clean(res, case)
        n_ok["prune"] += res.exit_code == 0
        res = invoke(project, "train", "--manifest", f, "--out", project / "out/m", "--epochs", "1")
        assert_clean(res, case)
        n_ok["train"] += res.exit_code == 0

    check()
    # the generator also produces valid manifests (which then really run)
    assert n_ok["prune"] >= 1 and n_ok["train"] >= 1, n_ok
