"""Per-file work (decode, check, header read) spread over worker processes, results in order.

Processes, not threads: PIL's per-file Python work holds the GIL, and on this project's 2-core
machine a thread pool was slower than one process for every kind of file measured (8×8 PNGs
3.5×, 224 px JPEGs 1.9×). Small inputs stay in this process: starting workers costs more than
they save.

Array work is the other way round: numpy releases the GIL inside its loops (ufuncs, gathers,
matrix products), so :func:`each_chunk` spreads chunks of it over threads that share the
arrays (the copy search on the 70k file: about 1.4× on 2 cores).
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterator, Sequence

from pipeline.errors import CleanError

#: below this many items one process does the work
PARALLEL_MIN = 2048
#: items per task sent to a worker
CHUNK = 512


def workers() -> int:
    """Worker processes to use: the CPUs this process may run on, at most 8; 1 inside a daemonic
    process (a DataLoader worker), which may not start processes of its own."""

    if multiprocessing.current_process().daemon:
        return 1
    return min(8, len(os.sched_getaffinity(0)))


def threads() -> int:
    """Threads for array work: the CPUs this process may run on, at most 8, and no more than
    OMP_NUM_THREADS where that is set (a run pinned to one thread stays on one)."""
    n = min(8, len(os.sched_getaffinity(0)))
    env = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, min(n, int(env))) if env.isdigit() and int(env) > 0 else max(1, n)


def each_chunk(fn: Callable[[int, int], None], n_items: int, chunk: int) -> None:
    """fn(lo, hi) for every chunk [lo, hi) of range(n_items), `chunk` items each, on :func:`threads`
    threads. fn writes its results into slices of arrays made beforehand (no two chunks write the
    same element), so the results are the same as one thread's; fn's exceptions are raised here.
    Meanwhile BLAS and torch run one thread each, process-wide (torch's count is restored after):
    not for use beside other torch work in the same process."""
    starts = range(0, int(n_items), int(chunk))
    n = threads()
    if n < 2 or len(starts) < 2:
        for lo in starts:
            fn(lo, min(lo + chunk, n_items))
        return
    from threadpoolctl import threadpool_limits

    # BLAS (numpy's matrix products) and torch (F.grid_sample) get one thread per chunk meanwhile: the chunks are
    # the parallelism. Otherwise each chunk's product starts a team of its own, and on this project's 2-core
    # machine the threads' teams spin against each other (thumbnail views of the 70k file 0.51 s on one thread,
    # 0.63 s on two). Each new thread takes torch's count at its first call.
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max_workers=n) as ex:
            for f in [ex.submit(fn, lo, min(lo + chunk, n_items)) for lo in starts]:
                f.result()
    finally:
        if torch is not None:
            torch.set_num_threads(before)


def map_chunks(fn: Callable[[list], list], items: Sequence, what: str = "files", parallel: bool = True) -> Iterator:
    """fn applied to consecutive chunks of `items` (fn: list → list of as many results), yielding
    the results one by one in order. With ≥ PARALLEL_MIN items and ≥ 2 CPUs the chunks go to
    worker processes, at most 4 per worker in flight (memory stays flat for a million items).
    `fn` must be a module-level function (it is pickled). `parallel=False`: this process only
    (where sending the results back costs more than computing them). A worker that dies (out of
    memory, a decoder crash) → CleanError naming `what`.
    """
    n = workers() if parallel else 1
    if len(items) < PARALLEL_MIN or n < 2:
        for lo in range(0, len(items), CHUNK):
            yield from fn(list(items[lo:lo + CHUNK]))
        return

    pending: deque = deque()
    try:
        with ProcessPoolExecutor(max_workers=n) as ex:
            for lo in range(0, len(items), CHUNK):
                pending.append(ex.submit(fn, list(items[lo:lo + CHUNK])))
                if len(pending) >= 4 * n:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
    except BrokenProcessPool:
        raise CleanError(f"a worker process reading the {what} died (out of memory, or a decoder crashed on a file); "
                         "run the command again, or move the newest files aside to find the one") from None
