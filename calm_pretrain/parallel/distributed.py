"""A process's place in a run, and collectives that also work in a single process.

The launcher's environment is read here and nowhere else in Python: torchrun sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; srun (slurm/common.sh: one task per GPU, no torchrun) sets
SLURM_PROCID, SLURM_STEP_NUM_TASKS and SLURM_LOCALID, which `rank_env_from_slurm` turns into the same
variables. `launched()`, `env_rank()`, `env_world_size()` and `local_rank()` answer from them before any
process group exists (the engine choice, the device, `calm-data encode`'s share); `init_distributed` joins
the group they describe. Without a process group the collectives return their input.
"""
from __future__ import annotations

import gc
import os
import sys
import time

import torch
import torch.distributed as dist


# ---- the launcher's environment --------------------------------------------------------------
def master_port_for_job(job_id: int) -> int:
    """The rendezvous port of Slurm job `job_id`, stable across requeues. The same formula as
    slurm/common.sh's `calm_master_port` (which exports MASTER_PORT for sbatch jobs): change both together
    (tests/test_slurm.py compares them)."""
    return 15000 + int(job_id) % 15000


def rank_env_from_slurm(env=None) -> None:
    """Launched by `srun` (one task per GPU, no torchrun): RANK, WORLD_SIZE, LOCAL_RANK from the task's
    SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID; MASTER_ADDR, unless exported (slurm/common.sh
    does), is the step's first host. SLURM_STEP_NUM_TASKS, not SLURM_NTASKS: srun sets it for its tasks
    only, while the batch shell's SLURM_NTASKS/SLURM_PROCID describe the allocation, and a plain run
    there must stay one process instead of waiting for ranks that never start."""
    env = os.environ if env is None else env
    if "RANK" in env or "SLURM_PROCID" not in env or int(env.get("SLURM_STEP_NUM_TASKS", "1")) <= 1:
        return
    if "MASTER_ADDR" not in env:
        import subprocess

        nodes = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
        env["MASTER_ADDR"] = subprocess.run(["scontrol", "show", "hostnames", nodes], check=True,
                                            capture_output=True, text=True).stdout.split()[0]
    env.setdefault("MASTER_PORT", str(master_port_for_job(env.get("SLURM_JOB_ID", "0"))))
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_STEP_NUM_TASKS"],
               LOCAL_RANK=env.get("SLURM_LOCALID", "0"))


def launched() -> bool:
    """Whether a launcher (torchrun, or srun once `rank_env_from_slurm` ran) started this process as a rank."""
    return "RANK" in os.environ


def env_rank() -> int:
    return int(os.environ.get("RANK", 0))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    """This process's index on its node (its GPU): LOCAL_RANK, 0 without a launcher."""
    return int(os.environ.get("LOCAL_RANK", 0))


def init_distributed(timeout_minutes: float = 30.0) -> tuple[int, int]:
    """Join the process group torchrun/srun describes (gloo on CPU, nccl on GPU); (rank, world_size)."""
    rank_env_from_slurm()
    if not launched():
        return 0, 1
    import datetime

    import deepspeed

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # Its shared-memory all-reduce op would be JIT-compiled (~90 s); gloo does the same job here.
        # (Patched through sys.modules: the module object differs from what a plain import returns.)
        import deepspeed.comm.torch  # noqa: F401
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    else:
        torch.cuda.set_device(local_rank())
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   timeout=datetime.timedelta(minutes=timeout_minutes))
    return dist.get_rank(), dist.get_world_size()


# ---- collectives -----------------------------------------------------------------------------
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
