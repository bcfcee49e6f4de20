"""Several processes (`torchrun`): which rank am I, join the group, gather results on rank 0.

`clean train` and `clean score` run unchanged under ``torchrun --nproc-per-node N``; torchrun
sets WORLD_SIZE, RANK and LOCAL_RANK, and `setup` joins the process group on first use
(`nccl` when the device is CUDA, with one GPU per process = LOCAL_RANK; `gloo` on CPU).
Without those variables everything here is a no-op for one process. Only rank 0 writes
files and reports progress. torch is imported lazily (the CLI reads `is_main` at start-up).
"""
from __future__ import annotations

import atexit
import os

from pipeline.errors import CleanError

_BACKEND: str | None = None


def world_size() -> int:
    """Number of processes (WORLD_SIZE, default 1)."""
    return int(os.environ.get("WORLD_SIZE") or 1)


def rank() -> int:
    """This process's rank (RANK, default 0)."""
    return int(os.environ.get("RANK") or 0)


def local_rank() -> int:
    """This process's rank on its machine (LOCAL_RANK, default 0): its GPU index."""
    return int(os.environ.get("LOCAL_RANK") or 0)


def enabled() -> bool:
    """True when launched by torchrun with more than one process."""
    return world_size() > 1


def is_main() -> bool:
    """True on rank 0 (the process that writes files and prints)."""
    return rank() == 0


def setup(device: str) -> str:
    """Join the process group when launched with several processes; return this rank's device.

    `device` is a resolved device ('cpu' or 'cuda'); under torchrun on CUDA each process
    takes GPU LOCAL_RANK ('cuda:<LOCAL_RANK>'). Idempotent; a no-op for one process.
    """
    global _BACKEND
    if not enabled():
        return device
    import torch
    import torch.distributed as dist

    cuda = str(device).startswith("cuda")
    if cuda:
        if local_rank() >= torch.cuda.device_count():
            raise CleanError(f"process LOCAL_RANK={local_rank()} has no GPU: {torch.cuda.device_count()} visible; "
                             "use --nproc-per-node ≤ the number of GPUs")
        torch.cuda.set_device(local_rank())
        device = f"cuda:{local_rank()}"
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
        _BACKEND = backend
        atexit.register(_teardown)
    elif _BACKEND is not None and _BACKEND != backend:
        raise CleanError(f"this process group uses {_BACKEND} but the device is {device}; "
                         "use one device for every stage of a torchrun job")
    return device


def _teardown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    if not enabled():
        return False
    import torch.distributed as dist

    return dist.is_initialized()


def barrier() -> None:
    if _active():
        import torch.distributed as dist

        dist.barrier()


def broadcast(obj):
    """Rank 0's `obj` on every rank (any picklable object; used for small messages)."""
    if not _active():
        return obj
    import torch.distributed as dist

    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0; None on the other ranks."""
    if not _active():
        return [obj]
    import torch.distributed as dist

    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_reduce_sum(array):
    """Element-wise sum over ranks of a numpy int64/float64 array (exact for integers)."""
    if not _active():
        return array
    import numpy as np
    import torch
    import torch.distributed as dist

    dev = f"cuda:{local_rank()}" if _BACKEND == "nccl" else "cpu"
    t = torch.as_tensor(np.ascontiguousarray(array)).to(dev)
    dist.all_reduce(t)
    return t.cpu().numpy()


def even_split(n: int, parts: int, i: int) -> tuple[int, int]:
    """The i-th of `parts` contiguous blocks of range(n), sizes differing by at most one."""
    q, r = divmod(n, parts)
    start = i * q + min(i, r)
    return start, start + q + (1 if i < r else 0)


def shard(n: int, batch_size: int, world: int | None = None, r: int | None = None) -> tuple[int, int]:
    """This rank's contiguous block of range(n), cut at multiples of `batch_size`.

    Every sample then lands in the same batch as in a one-process run (same numbers).
    """
    world = world_size() if world is None else world
    r = rank() if r is None else r
    nb = -(-n // batch_size)
    b0, b1 = even_split(nb, world, r)
    return min(n, b0 * batch_size), min(n, b1 * batch_size)
