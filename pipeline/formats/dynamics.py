"""models/<name>/dynamics.npz: the one reader of the per-epoch training record.

Arrays: ids [N], labels [N], lr [E], loss/margin/p_label float32 [E, N], correct bool [E, N],
track_ids [K], track_grad_norm float32 [E, K] (written by `clean train`).
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from pipeline.errors import CleanError


def load_dynamics(path: str | Path, need=("ids",)) -> dict:
    """Read a dynamics.npz (allow_pickle=False) → {name: array}; missing/corrupt → CleanError.

    `need`: arrays that must be present (a record without them is not readable).
    """
    path = Path(path)
    fix = f"re-run `clean train --out {path.parent}`"
    if not path.exists():
        raise CleanError(f"dynamics file not found: {path}; it is written by `clean train` (models/<name>/dynamics.npz)")
    try:
        with np.load(path, allow_pickle=False) as z:
            dyn = {k: z[k] for k in z.files}
        for k in need:
            dyn[k]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise CleanError(f"{path}: not a readable training record ({type(e).__name__}: {e}); {fix}") from None
    return dyn
