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


class StopVote:
    """Ranks agree on stopping without waiting for each other at every step.

    Each call starts an all-reduce of this rank's flag on a CPU (gloo) group and returns the result of
    the previous call's, which finished long ago: no device sync and no wait on the critical path. Every
    rank calls once per step, so every rank reads the same vote at the same step, one step after the
    first rank saw its signal. With one rank the flag is the vote."""

    def __init__(self):
        self._group = None
        self._flag: torch.Tensor | None = None
        self._work = None

    def __call__(self, local: bool) -> bool:
        if world_size() == 1:
            return local
        if self._group is None:  # a group of its own: no ordering against the engine's collectives
            self._group = dist.new_group(backend="gloo")
        agreed = self.finish()
        self._flag = torch.tensor([1.0 if local else 0.0])
        self._work = dist.all_reduce(self._flag, group=self._group, async_op=True)
        return agreed

    def finish(self) -> bool:
        """The pending vote's result (False if none is pending); call once after the last step."""
        if self._work is None:
            return False
        self._work.wait()
        self._work = None
        return bool(self._flag[0] > 0)  # a CPU tensor: no device sync


def all_reduce_sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over all ranks, in place, on its own device (itself in one process)."""
    if is_distributed():
        dist.all_reduce(t)
    return t
