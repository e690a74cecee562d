"""Collectives that also work in a single process (no process group: they return their input)."""
from __future__ import annotations

import gc
import time

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def shutdown() -> None:
    """Leave the process group so that the process exits with its own exit code.

    Gloo finishes each collective on a worker thread, which then drops its references to the tensors;
    for a tensor Python also holds, that takes the GIL. If the main thread reaches interpreter shutdown
    first, the worker is stopped inside a C++ destructor and the process aborts ("terminate called
    without an active exception", exit -6) after all its work is done; a launcher reads that as a failed
    run and a requeue code 75 is lost (seen in CI about once in ten 2-rank runs). Destroying the groups,
    collecting them and then letting go of the GIL once lets every pending release finish first.
    """
    if not is_distributed():
        return
    dist.destroy_process_group()
    gc.collect()
    time.sleep(0.05)  # releases the GIL: workers waiting for it finish their cleanup now, not at exit


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_object(obj) -> list:
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum of each value over all ranks (one collective for the whole list)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()
