"""`run_distributed_test(fn, world_size)`: run `fn(rank, world_size, *args)` in real gloo processes.

Every multi-process test goes through here. Processes are spawned (not forked), each with one CPU
thread, DeepSpeed's CPU accelerator and a fresh port; a failure in any rank fails the test with
that rank's traceback.
"""
from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, errors):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})
    import torch

    from calm_pretrain.parallel.distributed import shutdown

    torch.set_num_threads(1)
    try:
        fn(rank, world_size, *args)
    except BaseException:  # noqa: BLE001 - reported to the parent with the rank's traceback
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        shutdown()


def run_distributed_test(fn, world_size: int, *args, timeout: float = 300) -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, errors)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    if failures:
        rank, tb = sorted(failures)[0]
        raise AssertionError(f"rank {rank} failed:\n{tb}")
    if alive:
        raise AssertionError(f"{len(alive)} rank(s) still running after {timeout}s (hang)")
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise AssertionError(f"ranks exited with {bad}")


def launch_ranks(world_size: int, argv: list[str], log_dir, env: dict | None = None) -> list:
    """Start `python -m calm_pretrain.cli <argv>` as `world_size` rank processes (as torchrun or srun
    would: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), each its own process group so a test can
    signal or kill the whole run; output to log_dir/rank<r>.log."""
    import subprocess
    import sys
    from pathlib import Path

    port = _free_port()
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for r in range(world_size):
        rank_env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(r),
                    "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                    "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **(env or {})}
        out = open(log_dir / f"rank{r}.log", "a")
        procs.append(subprocess.Popen([sys.executable, "-m", "calm_pretrain.cli", *argv], env=rank_env, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def wait_ranks(procs, timeout: float = 300) -> list[int]:
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout))
        except Exception:
            for q in procs:
                q.kill()
            raise
    return codes
