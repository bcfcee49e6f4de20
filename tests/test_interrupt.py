"""A stage killed at any moment (SIGINT or SIGKILL) leaves its previous outputs byte-identical,
and the next run produces the correct result.

Every output goes through pipeline/io.atomic_path (write a temp file next to the target, then
os.replace), so the target is always either the complete old file or the complete new one.
To hit "mid-write" deterministically, `clean score` / `clean prune` run in a subprocess whose
atomic_path stalls after the temp file is written (or half written) and before the rename;
the test kills it there. Unpatched runs are also killed at a few delays around that moment.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

from .helpers import TINY_PARAMS, cwd, make_imagefolder

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

PARAMS = TINY_PARAMS + """\
prune:
  strategy: random
  keep: 0.5
"""

# a `clean` whose atomic_path stalls (sleeps) once the temp file of STALL_TARGET is written
# (STALL_MODE=partial: truncated to half, as if killed while writing), after writing its path to
# STALL_MARK, and before the rename
STALLING_CLEAN = r"""
import contextlib, os, time
from pathlib import Path
import pipeline.io as io

real = io.atomic_path
target, mode, mark = os.environ["STALL_TARGET"], os.environ["STALL_MODE"], os.environ["STALL_MARK"]

@contextlib.contextmanager
def stalling(path):
    with real(path) as tmp:
        yield tmp
        if Path(path).name == target:
            if mode == "partial":
                data = tmp.read_bytes()
                tmp.write_bytes(data[: len(data) // 2])
            Path(mark + ".part").write_text(str(tmp))
            os.replace(mark + ".part", mark)  # the test polls for `mark`: never let it see it half written
            time.sleep(600)

io.atomic_path = stalling
from cli.main import app
app(prog_name="clean")
"""

NEW = {"score": ["score", "--norm", "l1"], "prune": ["prune", "--keep", "0.8"]}
OUTPUTS = {"score": ["scores/scores.csv", "scores/meta.json"], "prune": ["data/pruned.csv", "prune/summary.json"]}


def clean(where: Path, *args):
    with cwd(where):
        res = runner.invoke(app, list(args))
    assert res.exit_code == 0, res.output
    return res


def env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CLEAN_DEBUG": "1", **extra}


def state(root: Path, stage: str) -> dict[str, bytes]:
    return {f: (root / f).read_bytes() for f in OUTPUTS[stage]}


@pytest.fixture(scope="module", autouse=True)
def _one_thread_like_the_children():
    """In-process runs use one torch thread, as the killed subprocesses (OMP_NUM_THREADS=1): the
    floating-point sums of some scores depend on the thread count in their last digits."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def project(tmp_path_factory, _one_thread_like_the_children):
    """A prepared + trained project with OLD score/prune outputs, and the NEW outputs expected
    from the commands in NEW (computed in a copy)."""
    root = tmp_path_factory.mktemp("interrupt")
    make_imagefolder(root / "p/data/imgs", n_per_class=10)
    (root / "p/params.yaml").write_text(PARAMS)
    for cmd in (["prepare"], ["train"], ["score"], ["flag"], ["prune"]):
        clean(root / "p", *cmd)
    ref = Path(shutil.copytree(root / "p", root / "ref"))
    new = {}
    for stage, cmd in NEW.items():
        clean(ref, *cmd)
        new[stage] = state(ref, stage)
    return root / "p", new, {}  # the last: seconds from start to the first write, per stage (measured)


@pytest.fixture
def proj(project, tmp_path):
    return Path(shutil.copytree(project[0], tmp_path / "p"))


def _restore_sigint() -> None:
    """In the child: SIGINT back to its default, even when pytest was started with SIGINT ignored
    (a background job inherits SIG_IGN, and Python then never raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _popen(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen(*args, preexec_fn=_restore_sigint, **kw)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> float:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended before the write ({proc.returncode}):\n{out}\n{err}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the stalled write")
        time.sleep(0.02)
    return time.monotonic() - t0


def assert_rerun_is_correct(p: Path, stage: str, new: dict) -> None:
    clean(p, *NEW[stage])
    for f in OUTPUTS[stage]:
        assert content_bytes((p / f).read_bytes(), f) == content_bytes(new[stage][f], f), f


def content_bytes(raw: bytes, name: str) -> bytes:
    """The bytes that must match (scores/meta.json: without its timing field "seconds")."""
    if name.endswith("meta.json"):
        d = json.loads(raw)
        d.pop("seconds", None)
        return json.dumps(d, sort_keys=True).encode()
    return raw


@pytest.mark.parametrize("stage,target,sig,mode", [
    ("score", "scores.csv", signal.SIGINT, "full"),
    ("score", "scores.csv", signal.SIGKILL, "partial"),
    ("prune", "pruned.csv", signal.SIGINT, "partial"),
    ("prune", "pruned.csv", signal.SIGKILL, "full"),
    ("prune", "summary.json", signal.SIGKILL, "partial"),
])
def test_killed_mid_write_keeps_old_outputs_and_rerun_works(project, proj, stage, target, sig, mode):
    new = project[1]
    old = state(proj, stage)
    mark = proj / "stalled.txt"
    proc = _popen([sys.executable, "-c", STALLING_CLEAN, *NEW[stage]], cwd=proj, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env(STALL_TARGET=target, STALL_MODE=mode, STALL_MARK=str(mark)))
    t_write = wait_for(mark, proc)
    project[2].setdefault(stage, t_write)
    tmp = Path(mark.read_text())
    assert tmp.exists() and tmp.name.startswith(f".{target}.")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, (out, err)
        assert "interrupted: previous outputs are left as they were" in " ".join((out + err).split())
        assert "Traceback" not in out + err
        assert not tmp.exists()  # the temp file was cleaned up
    else:
        assert proc.returncode == -signal.SIGKILL
    now = state(proj, stage)
    for f in OUTPUTS[stage]:
        if f.endswith(target):
            assert now[f] == old[f], f"{f} changed although its write was interrupted"
        else:  # the stage's other output: whole old or whole new, never partial
            assert content_bytes(now[f], f) in (content_bytes(old[f], f), content_bytes(new[stage][f], f)), f
    assert_rerun_is_correct(proj, stage, new)


@pytest.mark.parametrize("stage,kills", [
    ("score", [(0.6, signal.SIGKILL), (1.0, signal.SIGINT)]),
    ("prune", [(0.5, signal.SIGKILL), (0.97, signal.SIGINT), (1.03, signal.SIGKILL)]),
])
def test_killed_at_any_moment_leaves_old_or_new_never_partial(project, proj, stage, kills):
    """Unpatched `clean <stage>` killed at fractions of the time it takes to reach its first write."""
    new = project[1]
    old = state(proj, stage)
    t_write = project[2].get(stage)
    if t_write is None:  # measured by the mid-write tests above; measure here when run alone
        mark = proj / "stalled.txt"
        proc = _popen([sys.executable, "-c", STALLING_CLEAN, *NEW[stage]], cwd=proj, env=env(
            STALL_TARGET=Path(OUTPUTS[stage][0]).name, STALL_MODE="full", STALL_MARK=str(mark)),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t_write = wait_for(mark, proc)
        proc.kill()
        proc.wait()
        assert state(proj, stage) == old
    for frac, sig in kills:
        proc = _popen([sys.executable, "-m", "cli.main", *NEW[stage]], cwd=proj, env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(frac * t_write)
        proc.send_signal(sig)
        proc.wait(timeout=120)
        now = state(proj, stage)
        for f in OUTPUTS[stage]:
            assert content_bytes(now[f], f) in (content_bytes(old[f], f), content_bytes(new[stage][f], f)), \
                f"{f} is neither the old nor the new version after a kill at {frac:.2f} x {t_write:.1f}s"
    assert_rerun_is_correct(proj, stage, new)


ATOMIC_WRITER = r"""
import sys, time
from pipeline.io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    with open(tmp, "w") as f:
        f.write("new, half written")
        f.flush()
        print(tmp, flush=True)
        time.sleep(600)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
@pytest.mark.parametrize("existed", [True, False])
def test_atomic_path_killed_inside_the_context(tmp_path, sig, existed):
    target = tmp_path / "out" / "file.csv"
    if existed:
        target.parent.mkdir()
        target.write_text("old\n")
    proc = _popen([sys.executable, "-c", ATOMIC_WRITER, str(target)], env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.exists() and tmp.read_text() == "new, half written"
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    if existed:
        assert target.read_text() == "old\n"
    else:
        assert not target.exists()
    assert tmp.exists() == (sig == signal.SIGKILL)  # SIGINT cleans its temp file; SIGKILL cannot
    from pipeline.io import write_text

    write_text(target, "next run\n")  # a leftover temp file does not disturb the next write
    assert target.read_text() == "next run\n"
