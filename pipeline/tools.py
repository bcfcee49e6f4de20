"""The one place `clean` runs another program: `dvc` and `git`, as argument lists, never a shell.

`clean init`, `clean demo` and `clean versions` drive the user's DVC project through DVC's own
command line (its stable interface); nothing else in clean starts a process.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

#: the programs clean may run: argv prefix for each
PROGRAMS = {"dvc": [sys.executable, "-m", "dvc"], "git": ["git"]}


def run(program: str, args: list[str], cwd: str | Path) -> subprocess.CompletedProcess:
    """Run `program args...` (program: 'dvc' | 'git') in `cwd`, capturing text output; never raises
    on a non-zero exit (callers turn it into a CleanError naming the fix). DVC's analytics are off."""
    if program not in PROGRAMS:
        raise ValueError(f"clean runs only {sorted(PROGRAMS)}, not {program!r}")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([*PROGRAMS[program], *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, shell=False)
