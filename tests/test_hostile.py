"""Hostile use (issue 11): `clean` never loses a file.

Every case asserts what the README's Reliability section promises: bad input ends with exit
code 2 and one line naming the file or key and the fix (no traceback), legitimate input
succeeds, every input file is byte-identical afterwards and nothing is written outside the
named output. The kill tests stop a real process (os._exit) right after each file operation
of a stage's final swap or commit and check that the outputs are the complete old or the
complete new version, and that the next run (plain, and `--resume` for train) works.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline import ownership
from pipeline.io import FILE_MODE, JOURNAL

from .helpers import TINY_PARAMS, invoke, make_imagefolder, ok, project_fixtures

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


# --------------------------------------------------------------------------- helpers

def clean(where: Path, *args):
    return invoke(where, *args)


def one_line_error(res, message: str | None = None, starts: str | None = None) -> str:
    """Exit 2, no traceback, exactly one `error:` line (== message, or starting with `starts`)."""
    out = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output and "internal error" not in res.output, res.output
    assert out.count("error:") == 1, res.output
    got = out[out.rindex("error:") + len("error: "):]
    if message is not None:
        assert got == message, res.output
    if starts is not None:
        assert got.startswith(starts), res.output
    return got


def digest(p: Path) -> str:
    """sha256 of a file; of its arrays for .npz (np.savez stamps the zip entries with the time)."""
    if p.suffix == ".npz":
        h = hashlib.sha256()
        with np.load(p, allow_pickle=False) as z:
            for k in sorted(z.files):
                h.update(k.encode() + str(z[k].dtype).encode() + str(z[k].shape).encode() + z[k].tobytes())
        return "npz:" + h.hexdigest()
    return hashlib.sha256(p.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, str]:
    """digest of every file under root (relative paths)."""
    return {str(p.relative_to(root)): digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def refused(proj: Path, args, message: str | None = None, starts: str | None = None) -> str:
    """The command fails cleanly and leaves every file of the project as it was."""
    before = snapshot(proj)
    got = one_line_error(clean(proj, *args), message, starts)
    assert snapshot(proj) == before, changed(before, snapshot(proj))
    return got


def works(proj: Path, args, outputs) -> None:
    """The command succeeds, changes files only under `outputs` (prefixes) and leaves every
    other file byte-identical."""
    before = snapshot(proj)
    ok(clean(proj, *args))
    diff = changed(before, snapshot(proj))
    outside = {f for f in diff if not any(f == o or f.startswith(o.rstrip("/") + "/") for o in outputs)}
    assert not outside, outside


# prepare → train (1 epoch) → score → flag on 3 classes x 10 tiny images in data/imgs; a copy per test
_debug, base, proj = project_fixtures("hostile", TINY_PARAMS, symlinks=True)


def edit_csv(path: Path, fn) -> None:
    df = pd.read_csv(path, keep_default_na=False, dtype=str)
    fn(df).to_csv(path, index=False)


def env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CLEAN_DEBUG": "1", **extra}


# --------------------------------------------------------------------------- train owns its folder

MODEL_REFUSED = ("holds files that `clean train` did not write ({}); `clean train` replaces its model folder as a "
                 "whole, so give a new or empty folder (e.g. models/base), or move those files away")


def test_train_refuses_an_image_folder_whose_classes_are_named_like_its_outputs(proj):
    """The reported loss: classes `seeds` and `checkpoints` were deleted by `clean train --out`."""
    make_imagefolder(proj / "photos", n_per_class=3, classes=("checkpoints", "seeds"))
    refused(proj, ["train", "--out", "photos"],
            "--out photos " + MODEL_REFUSED.format("checkpoints/000.png, checkpoints/001.png, checkpoints/002.png, ..."))


@pytest.mark.parametrize("case", ["foreign file in a model folder", "another tool's model folder", "user file"])
def test_train_refuses_any_folder_holding_a_file_it_did_not_write(proj, case):
    out = proj / "models/other"
    if case == "foreign file in a model folder":  # clean's own folder, plus the user's notes
        shutil.copytree(proj / "models/base", out)
        (out / "notes.txt").write_text("mine")
        shown = "notes.txt"
    elif case == "another tool's model folder":  # config.json + model.safetensors, but not clean's
        out.mkdir(parents=True)
        (out / "config.json").write_text('{"architectures": ["Bert"]}')
        (out / "model.safetensors").write_bytes(b"weights")
        shown = "config.json, model.safetensors"
    else:
        out.mkdir(parents=True)
        (out / "README").write_text("x")
        shown = "README"
    refused(proj, ["train", "--out", "models/other"], "--out models/other " + MODEL_REFUSED.format(shown))


def test_train_takes_new_empty_own_and_older_model_folders(proj):
    (proj / "models/empty").mkdir()
    works(proj, ["train", "--out", "models/empty"], ["models/empty"])
    assert ownership.is_marked(proj / "models/empty")
    works(proj, ["train", "--out", "models/new/deep"], ["models/new"])
    # a model folder from before the marker existed is clean's too
    (proj / "models/base" / ownership.MARKER).unlink()
    works(proj, ["train"], ["models/base"])
    assert ownership.is_marked(proj / "models/base")


def test_two_trains_on_one_folder_the_second_is_refused_at_once(proj, tmp_path):
    """A real `clean train --out models/x`, held just before its swap (the moment a second run
    could mix the two), and a second `clean train --out models/x`: the second is refused at
    once, names the first, and changes nothing; the first then completes."""
    pause = tmp_path / "pause"
    first = subprocess.Popen([sys.executable, "-c", KILLER, "train", "--out", "models/x"], cwd=proj,
                             env=env(KILL_AT="-1", KILL_STAGE="train", KILL_PAUSE=str(pause)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.monotonic()
        while not Path(f"{pause}.here").exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() - t0 < 240
            time.sleep(0.05)
        before = snapshot(proj)
        got = one_line_error(clean(proj, "train", "--out", "models/x"))
        assert got == (f"--out models/x is in use by another `clean` run (process {first.pid}); wait for it to "
                       "finish or write to another folder")
        assert snapshot(proj) == before
        Path(f"{pause}.go").write_text("")
        out, err = first.communicate(timeout=240)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert ownership.is_marked(proj / "models/x") and (proj / "models/x/model.safetensors").exists()
    assert sorted(p.name for p in (proj / "models").iterdir()) == ["base", "x"]  # lock and staging gone


def test_a_lock_left_by_a_killed_run_is_no_obstacle(proj):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from pathlib import Path; from pipeline.ownership import locked\n"
         "with locked(Path('models/base')):\n    print('held', flush=True); time.sleep(120)"],
        cwd=proj, env=env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    assert ownership.lock_path(proj / "models/base").exists()  # SIGKILL: no cleanup
    works(proj, ["train"], ["models"])
    assert not ownership.lock_path(proj / "models/base").exists()


def test_weight_files_have_the_mode_of_every_other_output(proj):
    files = [p for p in (proj / "models/base").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(FILE_MODE)}
    outputs = [p for d in ("data", "scores") for p in (proj / d).glob("*.*") if p.is_file()]
    assert {oct(p.stat().st_mode & 0o777) for p in outputs} == {oct(FILE_MODE)}


# --------------------------------------------------------------------------- kill during a swap / commit

KILLER = r"""
import contextlib, os, shutil, sys
log, stage = os.environ.get("KILL_LOG"), os.environ["KILL_STAGE"]
# exit right after the `step`-th file operation of the commit (0: before the first); with `during`
# that operation is an rmtree: remove one file of it, then exit
cfg = {"step": int(os.environ.get("KILL_AT", "-1")), "during": os.environ.get("KILL_DURING") == "1"}
armed, count, depth = [False], [0], [0]

def counted(mod, name):
    real = getattr(mod, name)
    def op(*a, **k):
        if not armed[0] or depth[0]:
            return real(*a, **k)
        if cfg["during"] and count[0] + 1 == cfg["step"]:
            for dp, dn, fn in os.walk(a[0]):
                if fn:
                    os.unlink(os.path.join(dp, fn[0]))
                    break
            os._exit(99)
        depth[0] += 1
        try:
            r = real(*a, **k)
        finally:
            depth[0] -= 1
        count[0] += 1
        if log:
            with open(log, "a") as f:
                f.write(f"{name} {os.path.basename(str(a[0]))}\n")
        if count[0] == cfg["step"]:
            os._exit(99)
        return r
    setattr(mod, name, op)

for n in ("replace", "rename", "unlink"):
    counted(os, n)
counted(shutil, "rmtree")
import pipeline.ownership as own
counted(own, "_exchange")

def arm():
    armed[0] = True
    if cfg["step"] == 0:
        os._exit(99)
    pause = os.environ.get("KILL_PAUSE")
    if pause:  # hold here (the lock is held) until the test says go
        import time
        open(pause + ".here", "w").close()
        while not os.path.exists(pause + ".go"):
            time.sleep(0.05)

if stage == "train":
    import pipeline.stages.train as T
    real_publish = T._publish
    def publish(*a, **k):
        arm()
        return real_publish(*a, **k)
    T._publish = publish
else:
    import pipeline.io as io
    import pipeline.stages.prepare, pipeline.stages.score
    real_together = io.together
    @contextlib.contextmanager
    def together(folder):
        with real_together(folder):
            yield
            arm()  # every temp file is written; the commit starts
    pipeline.stages.prepare.together = together
    pipeline.stages.score.together = together
from cli.main import app
jobs = os.environ.get("KILL_JOBS")
if not jobs:
    app(prog_name="clean")
else:  # one process imports everything once; each job is a forked child killed at its step
    import json
    codes = []
    for folder, step, during in json.loads(jobs):
        pid = os.fork()
        if pid == 0:
            os.chdir(folder)
            cfg.update(step=step, during=during)
            try:
                app(args=sys.argv[1:], prog_name="clean")
            except SystemExit as e:
                os._exit(e.code if isinstance(e.code, int) else 0 if e.code is None else 1)
            os._exit(0)
        codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    with open(os.environ["KILL_RESULTS"], "w") as f:
        json.dump(codes, f)
"""


def run_killed(proj: Path, stage: str, args, jobs, log: Path | None = None) -> None:
    """Run `clean <args>` in each (folder, step, during) of `jobs`, killed at that step of the
    stage's commit (one driver process; a forked child per job)."""
    results = proj.parent / f"{proj.name}.codes.json"
    extra = dict(KILL_STAGE=stage, KILL_JOBS=json.dumps([[str(d), k, bool(x)] for d, k, x in jobs]),
                 KILL_RESULTS=str(results))
    if log is not None:
        extra["KILL_LOG"] = str(log)
    p = subprocess.run([sys.executable, "-c", KILLER, *args], cwd=proj, env=env(**extra),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    codes = json.loads(results.read_text())
    assert all(c in (0, 99) for c in codes), (codes, p.stderr[-3000:])
    assert [c == 0 for c in codes] == [k < 0 for _, k, _ in jobs], codes  # every armed job was killed


def steps_of(proj: Path, stage: str, args, tmp: Path) -> list[tuple[int, bool, str]]:
    """(step, during, what) for every file operation of the commit, found by a run that is not killed."""
    work = Path(shutil.copytree(proj, tmp / "steps"))
    log = tmp / "steps.log"
    run_killed(work, stage, args, [(work, -1, False)], log=log)
    ops = log.read_text().split("\n")[:-1]
    assert ops, "no file operation was recorded"
    out = [(0, False, "before the first operation")]
    for i, what in enumerate(ops, 1):
        if what.startswith("rmtree"):
            out.append((i, True, "during " + what))
        out.append((i, False, "after " + what))
    return out


def model_files(folder: Path) -> dict[str, str]:
    """The model folder's files (its work folder .partial aside), sha256 each."""
    return {k: v for k, v in snapshot(folder).items() if not k.startswith(".partial/")}


def same_model(a: dict, b: dict) -> bool:
    """Same files; same bytes except metrics.json (its `seconds`), compared without timings."""
    return a.keys() == b.keys() and all(a[k] == b[k] for k in a if not k.endswith("metrics.json"))


@pytest.fixture(scope="module")
def interrupted_train(base, tmp_path_factory):
    """models/base holds an OLD model and, in .partial, a finished NEW run (seed 1) that was
    interrupted just before its swap; NEW = what `--resume` then puts in place."""
    import torch

    import pipeline.stages.train as T

    root = Path(shutil.copytree(base, tmp_path_factory.mktemp("swap") / "p"))
    real, threads = T._publish, torch.get_num_threads()

    def stop(*a, **k):
        raise KeyboardInterrupt

    T._publish = stop
    torch.set_num_threads(1)  # as the killed processes and the reruns: the same floating-point sums
    try:
        assert clean(root, "train", "--seed", "1").exit_code == 130
    finally:
        T._publish = real
        torch.set_num_threads(threads)
    assert (root / "models/base/.partial/primary/metrics.json").exists()
    old = model_files(root / "models/base")
    ref = Path(shutil.copytree(root, root.parent / "ref"))
    torch.set_num_threads(1)
    try:
        ok(clean(ref, "train", "--seed", "1", "--resume"))
    finally:
        torch.set_num_threads(threads)
    new = model_files(ref / "models/base")
    assert not same_model(old, new)
    return root, old, new


def leftovers(models: Path) -> list[str]:
    return sorted(p.name for p in models.iterdir() if p.name != "base")


def test_train_killed_at_every_step_of_the_swap(interrupted_train, tmp_path, one_thread):
    """os._exit right after (or during) each file operation of the final swap: the model folder
    is the complete old or the complete new one, and the next plain and --resume runs work."""
    root, old, new = interrupted_train
    args = ["train", "--seed", "1", "--resume"]
    steps = steps_of(root, "train", args, tmp_path)
    works_ = {(k, d): Path(shutil.copytree(root, tmp_path / f"k{k}{'d' if d else ''}")) for k, d, _ in steps}
    run_killed(root, "train", args, [(works_[k, d], k, d) for k, d, _ in steps])
    seen = set()
    for step, during, what in steps:
        work = works_[step, during]
        now = model_files(work / "models/base")
        state = "old" if now == old else "new" if same_model(now, new) else None
        assert state, f"killed {what}: models/base is neither the old nor the new model: {sorted(now)}"
        seen.add(state)
        for rerun in (["train", "--seed", "1"], args):
            again = Path(shutil.copytree(work, tmp_path / f"r{step}{'d' if during else ''}{len(rerun)}"))
            ok(clean(again, *rerun))
            assert same_model(model_files(again / "models/base"), new), (what, rerun)
            assert not (again / "models/base/.partial").exists() and leftovers(again / "models") == [], (what, rerun)
            shutil.rmtree(again)
        shutil.rmtree(work)
    assert seen == {"old", "new"}


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_swap_in_killed_at_every_step_leaves_a_complete_folder(tmp_path, exchange):
    """The swap itself, with and without RENAME_EXCHANGE: after a kill at any step the folder
    (after `recover`, which every train runs first) is complete-old or complete-new."""
    script = r"""
import os, shutil, sys
from pathlib import Path
import pipeline.ownership as own
step, count = int(sys.argv[1]), [0]
if sys.argv[2] == "0":
    own._exchange = lambda a, b: False
def counted(mod, name):
    real = getattr(mod, name)
    def op(*a, **k):
        r = real(*a, **k)
        count[0] += 1
        if count[0] == step:
            os._exit(99)
        return r
    setattr(mod, name, op)
for n in ("rename", "replace"):
    counted(os, n)
counted(shutil, "rmtree")
counted(own, "_exchange")
own.swap_in(Path("m/.base.clean-new"), Path("m/base"))
print(count[0])
"""

    def make(where: Path):
        for name, text in (("base", "old"), (".base.clean-new", "new")):
            d = where / "m" / name
            (d / "checkpoints").mkdir(parents=True)
            for f in ("model.safetensors", "config.json", "checkpoints/epoch_001.safetensors"):
                (d / f).write_text(f"{text} {f}")
            ownership.mark(d)

    ref = tmp_path / "ref"
    make(ref)
    p = subprocess.run([sys.executable, "-c", script, "-1", "1" if exchange else "0"], cwd=ref, env=env(),
                       capture_output=True, text=True)
    n = int(p.stdout.strip())
    assert n == (2 if exchange else 4)  # exchange, rmtree | exchange (unsupported), rename, rename, rmtree
    for step in range(n + 1):
        w = tmp_path / f"s{step}"
        make(w)
        subprocess.run([sys.executable, "-c", script, str(step), "1" if exchange else "0"], cwd=w, env=env())
        ownership.recover(w / "m/base")
        texts = {(w / "m/base" / f).read_text() for f in ("model.safetensors", "config.json",
                                                          "checkpoints/epoch_001.safetensors")}
        assert texts in ({"old model.safetensors", "old config.json", "old checkpoints/epoch_001.safetensors"},
                         {"new model.safetensors", "new config.json", "new checkpoints/epoch_001.safetensors"}), step
        assert sorted(p.name for p in (w / "m").iterdir()) == ["base"]


def stage_files(root: Path, files) -> dict[str, bytes]:
    return {f: (digest(root / f).encode() if f.endswith(".npz") else (root / f).read_bytes())
            for f in files if (root / f).exists()}


def content(files: dict[str, bytes]) -> dict[str, bytes]:
    """meta.json without its timing field."""
    out = dict(files)
    for k, v in files.items():
        if k.endswith("meta.json"):
            d = json.loads(v)
            d.pop("seconds", None)
            out[k] = json.dumps(d, sort_keys=True).encode()
    return out


COMMITS = {
    "prepare": (["prepare", "--seed", "1"], "data", ["data/manifest.csv", "data/classes.json", "data/problems.csv"]),
    "score": (["score", "--norm", "l1"], "scores", ["scores/scores.csv", "scores/meta.json", "scores/embeddings.npz"]),
}


@pytest.mark.parametrize("stage", list(COMMITS))
def test_stage_killed_at_every_step_of_its_commit(base, tmp_path, stage, one_thread):
    """All outputs of a stage change together: killed after any file operation of the commit,
    the files are all old (no journal) or, once the journal exists, all new as soon as any
    command reads the folder; the next run works."""
    from pipeline.io import settle

    args, folder, files = COMMITS[stage]
    root = Path(shutil.copytree(base, tmp_path / "p"))
    if stage == "prepare":  # the new run finds one more image and a broken one: all three files differ
        (root / "data/imgs/a/zz_broken.png").write_bytes(b"not a png")
        shutil.copy(root / "data/imgs/b/000.png", root / "data/imgs/b/zz_more.png")
    old = content(stage_files(root, files))
    ref = Path(shutil.copytree(root, tmp_path / "ref"))
    ok(clean(ref, *args))
    new = content(stage_files(ref, files))
    assert all(old[f] != new[f] for f in files if f in old and not f.endswith("embeddings.npz")), "old == new"
    steps = [(k, what) for k, during, what in steps_of(root, stage, args, tmp_path) if not during]
    works_ = {k: Path(shutil.copytree(root, tmp_path / f"k{k}")) for k, _ in steps}
    run_killed(root, stage, args, [(works_[k], k, False) for k, _ in steps])
    seen = set()
    for step, what in steps:
        work = works_[step]
        raw = content(stage_files(work, files))
        pending = (work / folder / JOURNAL).exists()
        assert raw == old or raw == new or pending, f"killed {what}: a mix of old and new with no journal"
        # what any command sees: a reader finishes the commit first
        if stage == "prepare":
            from pipeline.formats.manifest import read_classes, read_manifest

            read_manifest(work / "data/manifest.csv", read_classes(work / "data/classes.json")["classes"])
        settle(work / folder)
        seen_now = content(stage_files(work, files))
        assert seen_now in (old, new), f"killed {what}: neither all old nor all new"
        assert seen_now == (new if pending else raw)
        seen.add("old" if seen_now == old else "new")
        ok(clean(work, *args))
        assert content(stage_files(work, files)) == new, what
        assert not (work / folder / JOURNAL).exists()
        shutil.rmtree(work)
    assert seen == {"old", "new"}


def test_failed_prepare_replaces_none_of_its_files(proj, monkeypatch):
    """A prepare that fails while writing its last file leaves all three old files."""
    import pipeline.stages.prepare as P

    files = ["data/manifest.csv", "data/classes.json", "data/problems.csv"]
    old = stage_files(proj, files)
    real = P.write_csv

    def fail_on_manifest(path, header, rows):
        if Path(path).name == "manifest.csv":
            raise OSError(28, "No space left on device")
        return real(path, header, rows)

    monkeypatch.setattr(P, "write_csv", fail_on_manifest)
    res = clean(proj, "prepare", "--seed", "1")
    assert res.exit_code == 2 and "error: no space left on the disk" in res.output  # the user's disk, not a bug
    assert stage_files(proj, files) == old
    assert not [p.name for p in (proj / "data").iterdir() if p.name.endswith(".tmp") or p.name == JOURNAL]


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS refuses file names that are not UTF-8")
def test_names_that_are_not_utf8_go_to_problems_csv(proj):
    imgs = os.fsencode(proj / "data/imgs")
    good = (proj / "data/imgs/a/000.png").read_bytes()
    with open(os.path.join(imgs, b"a", b"caf\xe9.png"), "wb") as f:  # Latin-1 file name
        f.write(good)
    os.mkdir(os.path.join(imgs, b"\xff\xfeclass"))  # a class folder whose name is not UTF-8
    with open(os.path.join(imgs, b"\xff\xfeclass", b"x.png"), "wb") as f:
        f.write(good)
    works(proj, ["prepare"], ["data/manifest.csv", "data/classes.json", "data/problems.csv"])
    problems = pd.read_csv(proj / "data/problems.csv")
    assert dict(zip(problems["path"], problems["reason"])) == {
        "imgs/a/caf\\xe9.png": "file or folder name is not valid UTF-8 (rename it)",
        "imgs/\\xff\\xfeclass/x.png": "class folder name is not valid UTF-8 (rename it)"}
    assert json.loads((proj / "data/classes.json").read_text())["classes"] == ["a", "b", "c"]
    works(proj, ["train"], ["models/base"])


# --------------------------------------------------------------------------- outputs never touch inputs

SAME = "an output never replaces an input; give {opt} another path"
INSIDE = "outputs never go into an input folder; give {opt} a path outside it"
OVERWRITES = {
    "show --out the manifest": (["show", "--out", "data/manifest.csv"],
                                "--out data/manifest.csv is --manifest data/manifest.csv, an input of `clean show`: "
                                + SAME.format(opt="--out")),
    "flag --metrics the scores": (["flag", "--metrics", "scores/scores.csv"],
                                  "--metrics scores/scores.csv is --scores scores/scores.csv, an input of "
                                  "`clean flag`: " + SAME.format(opt="--metrics")),
    "prune --summary classes.json": (["prune", "--summary", "data/classes.json"],
                                     "--summary data/classes.json is the classes.json of --manifest "
                                     "data/classes.json, an input of `clean prune`: " + SAME.format(opt="--summary")),
    "compare --out its first input": (["compare", "scores/scores.csv", "scores/b.csv", "--out", "scores/scores.csv"],
                                      "--out scores/scores.csv is SCORES_A scores/scores.csv, an input of "
                                      "`clean compare`: " + SAME.format(opt="--out")),
    "compare --png its second input": (["compare", "scores/scores.csv", "scores/b.csv", "--png", "scores/./b.csv"],
                                       "--png scores/b.csv is SCORES_B scores/b.csv, an input of `clean compare`: "
                                       + SAME.format(opt="--png")),
    "prune --summary the attribution it reads": (["prune", "--summary", "scores/attribution.npz"],
                                                 "--summary scores/attribution.npz is the attribution.npz beside "
                                                 "--scores scores/attribution.npz, an input of `clean prune`: "
                                                 + SAME.format(opt="--summary")),
    "flag --metrics the attribution it reads": (["flag", "--metrics", "scores/attribution.npz"],
                                                "--metrics scores/attribution.npz is the attribution.npz beside "
                                                "--scores scores/attribution.npz, an input of `clean flag`: "
                                                + SAME.format(opt="--metrics")),
    "prune --out the scores": (["prune", "--out", "scores/scores.csv"],
                               "--out scores/scores.csv is --scores scores/scores.csv, an input of `clean prune`: "
                               + SAME.format(opt="--out")),
    "score --out the model folder": (["score", "--out", "models/base"],
                                     "--out models/base is --model models/base, an input of `clean score`: "
                                     + SAME.format(opt="--out")),
    "score --out inside the image folder": (["score", "data/imgs", "--out", "data/imgs/a"],
                                            "--out data/imgs/a lies inside PATH data/imgs, an input of "
                                            "`clean score`: " + INSIDE.format(opt="--out")),
    "flag --out inside the model": (["flag", "--out", "models/base/x"],
                                    "--out models/base/x/flags.csv lies inside --model models/base, an input of "
                                    "`clean flag`: " + INSIDE.format(opt="--out")),
    "train --out inside an image folder": (["train", "--out", "data/imgs/a/model"],
                                           "--out data/imgs/a/model lies inside data/imgs/a (a folder of images "
                                           "listed in data/manifest.csv), an input of `clean train`: "
                                           + INSIDE.format(opt="--out")),
    "prepare --out the image folder": (["prepare", "--out", "data/imgs"],
                                       "--out data/imgs is data.root data/imgs, an input of `clean prepare`: "
                                       + SAME.format(opt="--out")),
    "show --out the source images": (["show", "--out", "data/imgs/a/000.png"],
                                     "--out data/imgs/a/000.png lies inside data/imgs/a (a folder of images listed "
                                     "in data/manifest.csv), an input of `clean show`: " + INSIDE.format(opt="--out")),
    "report --out inside the model": (["report", "--out", "models/base"],
                                      "--out models/base/index.html lies inside the model folder of --dynamics "
                                      "models/base, an input of `clean report`: " + INSIDE.format(opt="--out")),
    "figures --out the scores' folder": (["figures", "--out", "models/base"],
                                         "--out models/base/grad_heatmap.csv lies inside the model folder of "
                                         "--dynamics models/base, an input of `clean figures`: "
                                         + INSIDE.format(opt="--out")),
    "evaluate into the model": (["evaluate", "--model", "models/base", "--name", "base"], None),
}


@pytest.mark.parametrize("case", list(OVERWRITES))
def test_no_output_is_an_input_or_inside_one(proj, case):
    args, message = OVERWRITES[case]
    if message is None:
        works(proj, args, ["metrics/base.json", "plots/confusion_base.csv", "plots/evaluate_base.json"])
        return
    shutil.copy(proj / "scores/scores.csv", proj / "scores/b.csv")
    refused(proj, args, message)


@pytest.mark.parametrize("args,option,becomes", [
    (["evaluate", "--name", "../../escaped"], "--name", "metrics/<name>.json and plots/confusion_<name>.csv"),
    (["evaluate", "--name", "/tmp/x"], "--name", "metrics/<name>.json and plots/confusion_<name>.csv"),
    (["retrain", "--manifest", "data/manifest.csv", "--name", "a/b"], "--name",
     "metrics/<name>.json and plots/confusion_<name>.csv"),
    (["show", "--by", "../../loss"], "--by", "reports/top_<by>.png"),
    (["report", "--by", "../loss"], "--by", "<out>/figures/top_<by>.png"),
])
def test_names_given_on_the_command_line_stay_in_their_folder(proj, args, option, becomes):
    value = args[args.index(option) + 1]
    refused(proj, args, f"{option} {value!r} must be a plain name (letters, digits, '.', '_', '-'; at most 100), "
                        f"not a path: it becomes {becomes}")


# --------------------------------------------------------------------------- nothing outside the project

def test_report_shows_only_images_the_manifest_lists(proj, base, tmp_path):
    """A tampered scores.csv pointing at files outside the prepared source: never embedded."""
    from pipeline.views.report import png_data_uri, thumbnail_png

    pristine = Path(shutil.copytree(base, tmp_path / "pristine"))
    secret = np.full((8, 8), 123, np.uint8)
    secret[::2, ::2] = 7
    outside = tmp_path / "secret.png"
    Image.fromarray(secret).save(outside)
    edit_csv(proj / "scores/scores.csv", lambda df: df.assign(
        path=[str(outside) if i % 2 else "../../secret.png" for i in range(len(df))]))
    assert (proj / "data/../../secret.png").resolve() == outside.resolve()  # both reach the secret
    works(proj, ["report"], ["reports"])
    page = (proj / "reports/index.html").read_text()
    assert png_data_uri(thumbnail_png(secret[None])) not in page
    m = pd.read_csv(proj / "data/manifest.csv")
    own = {png_data_uri(thumbnail_png(np.asarray(Image.open(proj / "data" / p))[None]))
           for p in m[m["split"] == "train"]["path"]}
    assert sum(uri in page for uri in own) >= 1  # the flagged cards show the manifest's own images
    # `clean show` draws the same grid as from the untampered scores
    works(pristine, ["show", "--out", "reports/top.png"], ["reports"])
    works(proj, ["show", "--out", "reports/top.png"], ["reports"])
    assert (proj / "reports/top.png").read_bytes() == (pristine / "reports/top.png").read_bytes()


# --------------------------------------------------------------------------- bad data: one clear line

def test_images_of_different_sizes_are_resized_to_the_most_common_size(proj):
    """Legitimate input: mixed sizes with no data.image_size train (every split at one size)."""
    rng = np.random.default_rng(0)
    for i in range(4):  # larger images in every class, some of them in val/test
        for c in "abc":
            Image.fromarray(rng.integers(0, 255, (12, 10), dtype=np.uint8)).save(proj / f"data/imgs/{c}/big{i}.png")
    res = clean(proj, "prepare")
    ok(res)
    assert ("the images have 2 sizes (HxW: 8x8 (30), 12x10 (12)); training resizes every image to 8x8, the most "
            "common one: set data.image_size to choose another size") in " ".join(res.output.split())
    assert json.loads((proj / "data/classes.json").read_text())["image_size"] == [8, 8]
    works(proj, ["train"], ["models/base"])
    assert json.loads((proj / "models/base/config.json").read_text())["image_size"] == [8, 8]
    works(proj, ["evaluate"], ["metrics", "plots"])
    works(proj, ["score"], ["scores"])


@pytest.mark.parametrize("where,args,message", [
    ("params", ["train"], "params.yaml: train.seeds: seed 4294967296 is too large; seeds must be integers from 0 to "
                          "4294967295 (2**32 - 1)"),
    ("cli", ["train", "--seed", "4294967296"], "command-line options: train.seeds: seed 4294967296 is too large; "
                                               "seeds must be integers from 0 to 4294967295 (2**32 - 1)"),
    ("cli", ["prepare", "--seed", "4294967296"], "command-line options: data.seed must be ≥ 0 and ≤ 4294967295, "
                                                 "got 4294967296"),
    ("cli", ["prune", "--seed", "-1"], "command-line options: prune.seed must be ≥ 0 and ≤ 4294967295, got -1"),
    ("params-flag", ["flag"], "params.yaml: flag.seed must be ≥ 0 and ≤ 4294967295, got 18446744073709551616"),
])
def test_seeds_beyond_2_to_the_32_are_refused_up_front(proj, where, args, message):
    if where == "params":
        (proj / "params.yaml").write_text(TINY_PARAMS.replace("seeds: [0]", "seeds: [4294967296]"))
    if where == "params-flag":
        (proj / "params.yaml").write_text(TINY_PARAMS + "  seed: 18446744073709551616\n")
    refused(proj, args, message)


def test_largest_seed_is_accepted(proj):
    works(proj, ["train", "--seed", "4294967295", "--out", "models/s"], ["models/s"])


def test_scores_of_another_dataset_are_refused_by_flag(proj, tmp_path):
    """Another dataset of the same shape (same ids, same labels): its image paths give it away."""
    other = tmp_path / "other"
    make_imagefolder(other / "data/imgs", n_per_class=10, classes=("x", "y", "z"), seed=5)
    (other / "params.yaml").write_text(TINY_PARAMS)
    for cmd in (["prepare"], ["train"], ["score"]):
        ok(clean(other, *cmd))
    (proj / "elsewhere").mkdir()
    for f in ("scores.csv", "meta.json"):
        shutil.copy(other / "scores" / f, proj / "elsewhere" / f)
    sc = pd.read_csv(proj / "elsewhere/scores.csv")
    first = sc.sort_values("id").iloc[0]
    m = pd.read_csv(proj / "data/manifest.csv").set_index("id")
    msg = (f"elsewhere/scores.csv does not match data/manifest.csv: id {first['id']} is {first['path']!r} with label "
           f"{first['label']} in the scores but {m.loc[first['id'], 'path']!r} with label {m.loc[first['id'], 'label']} "
           f"in the manifest ({len(sc)} differ); the scores come from another dataset: pass the manifest they were "
           "computed on (--manifest) or rerun `clean score`")
    refused(proj, ["flag", "--scores", "elsewhere/scores.csv", "--out", "elsewhere"], msg)
    sc["id"] += 1000
    sc.to_csv(proj / "elsewhere/scores.csv", index=False)
    refused(proj, ["flag", "--scores", "elsewhere/scores.csv", "--out", "elsewhere"],
            f"scores hold id {first['id'] + 1000} which is not in data/manifest.csv; the scores come from another "
            "manifest: rerun `clean score`")


@pytest.mark.parametrize("column", ["value", "is_label", "label_score", "flagged", "suggested_label"])
def test_non_numeric_flags_are_refused_by_report(proj, column):
    fl = proj / "scores/flags.csv"
    if column not in pd.read_csv(fl).columns:
        pytest.skip(f"flags.csv has no {column} column")
    edit_csv(fl, lambda df: df.assign(**{column: ["abc"] + list(df[column][1:])}))
    kind = "be 0 or 1" if column == "flagged" or column.startswith("is_") else "hold numbers"
    got = refused(proj, ["report"])
    assert got.endswith(f"scores/flags.csv: column '{column}' must {kind}; row 2 has 'abc'; re-run `clean flag`"), got


@pytest.mark.parametrize("value", [0, "NaN", -1])
@pytest.mark.parametrize("command", [["score"], ["evaluate"], ["flag", "--method", "isolation-forest"]])
def test_model_config_with_std_zero_or_nan_is_refused(proj, value, command):
    cfg = proj / "models/base/config.json"
    d = json.loads(cfg.read_text())
    d["std"] = [value if value != "NaN" else float("nan")]
    cfg.write_text(json.dumps(d))
    shown = "[nan]" if value == "NaN" else f"[{value}]"
    refused(proj, command, f"models/base/config.json: 'std' must hold finite numbers > 0, got {shown}; retrain it: "
                           "clean train --out models/base")


def test_model_giving_nan_losses_never_writes_scores(proj, monkeypatch):
    """A model whose outputs are NaN (config numbers that pass, weights that blow up): score refuses."""
    import pipeline.scores.compute as S  # the forward family (pipeline/scores/compute.py) runs it

    real = S.forward_scores

    def nan_loss(*a, **k):
        s = real(*a, **k)
        s["loss"] = np.full_like(s["loss"], np.nan)
        return s

    monkeypatch.setattr(S, "forward_scores", nan_loss)
    refused(proj, ["score"], "models/base: the model gives a NaN/inf loss on 18 of 18 'train' images, so no score "
                             "would mean anything; its weights or config.json are broken: retrain it with "
                             "`clean train --out models/base`")


def test_broken_validation_image_is_named_before_training_when_streaming(proj):
    m = pd.read_csv(proj / "data/manifest.csv")
    path = m[m["split"] == "val"]["path"].iloc[-1]
    (proj / "data" / path).write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    res = clean(proj, "train", "--cache-max-gb", "0", "--workers", "2", "--out", "models/s")
    got = one_line_error(res)
    assert got == (f"cannot read image {path}: not an image (unrecognised format); run `clean prepare`, which lists "
                   "unreadable files in data/problems.csv, and fix or remove them")
    assert "epoch 1/1" not in res.output  # named before the first epoch
    assert not (proj / "models/s").exists()


def test_image_path_with_hash_is_a_file_not_an_idx_reference(proj):
    """A CSV source listing `scan#12` (an image whose name holds # and digits)."""
    src = proj / "data/imgs"
    rows = ["path,label"]
    for i, p in enumerate(sorted(src.rglob("*.png"))):
        dst = proj / "csvsrc" / p.parent.name / f"scan#{i}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dst)
        rows.append(f"{dst.relative_to(proj / 'csvsrc')},{p.parent.name}")
    (proj / "csvsrc/list.csv").write_text("\n".join(rows) + "\n")
    (proj / "params.yaml").write_text(TINY_PARAMS.replace("source: imagefolder", "source: csv")
                                      .replace("root: data/imgs", "root: csvsrc/list.csv"))
    works(proj, ["prepare"], ["data/manifest.csv", "data/classes.json", "data/problems.csv"])
    assert pd.read_csv(proj / "data/problems.csv").empty
    assert pd.read_csv(proj / "data/manifest.csv")["path"].str.contains("#").all()
    works(proj, ["train"], ["models/base"])


@pytest.mark.parametrize("text", ["1e-3", "1E-3", "+1e-3", "1.0e-3"])
def test_lr_written_like_1e_minus_3_is_a_number(proj, text):
    (proj / "params.yaml").write_text(TINY_PARAMS.replace("  epochs: 1\n", f"  epochs: 1\n  lr: {text}\n"))
    works(proj, ["train"], ["models/base"])
    assert json.loads((proj / "models/base/config.json").read_text())["recipe"]["lr"] == 0.001
