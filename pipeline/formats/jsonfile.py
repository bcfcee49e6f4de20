"""Reading a small JSON file (classes.json, a model's config.json) with one error wording."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import CleanError
from pipeline.io import settled


def read_json(path: str | Path, missing: str, fix: str):
    """json.loads of `path`; CleanError "`path` `missing`" when absent, "not valid JSON ...; `fix`" when broken."""

    path = settled(path)  # a commit of several files that a kill interrupted is finished first
    if not path.is_file():
        raise CleanError(f"{path} {missing}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CleanError(f"{path}: not valid JSON ({e}); {fix}") from None
    except RecursionError:  # `[[[[...` thousands deep
        raise CleanError(f"{path}: not valid JSON (nested too deeply); {fix}") from None
    except OSError as e:
        raise CleanError(f"cannot read {path}: {e.strerror or e}") from None
