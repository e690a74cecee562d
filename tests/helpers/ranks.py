"""The one way tests start several rank processes, and wait for them.

Two kinds of rank process, one waiting rule:

- `launch_ranks(n, argv, log_dir)` starts `python -m calm_pretrain.cli <argv>` (or any other module,
  or `python -c ...`) as n processes with the environment torchrun or srun gives (RANK, WORLD_SIZE,
  LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT), one CPU thread and DeepSpeed's CPU accelerator,
  each in its own session so a test can signal or kill the whole run; output to log_dir/rank<r>.log.
- `run_distributed_test(fn, n, *args)` runs `fn(rank, n, *args)` in n spawned (not forked) processes
  with the same environment; each one's output goes to a log file of its own as well.

`RankGroup.wait(timeout)` has ONE deadline for the whole group. The first rank to exit with a code
other than the expected one, or the deadline, kills every rank still running (a surviving rank would
otherwise block in a collective), and the AssertionError shows every rank's exit code and output.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from tests.helpers import REPO

OUTPUT_TAIL = 6000  # characters of each rank's log shown on failure


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int, env: dict | None = None) -> dict:
    """The environment of rank `rank`: the test's own, the repository first on PYTHONPATH (so the ranks
    import this checkout, not another install), the launcher's variables, then `env`."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "RANK": str(rank), "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **(env or {})}


_LIVE: list["RankGroup"] = []  # every group started; kill_leftovers() stops what a test left running


def kill_leftovers() -> int:
    """Kill every rank still running (a test that failed or was interrupted before its wait); the
    number of groups that still had one. tests/conftest.py calls it after each test and at exit."""
    left = [g for g in _LIVE if any(c is None for c in g.codes())]
    for g in left:
        g.kill()
        g._reap(10)
    _LIVE.clear()
    return len(left)


atexit.register(kill_leftovers)


class RankGroup:
    """Processes of one run (subprocess.Popen or multiprocessing.Process), rank r logging to logs[r]."""

    def __init__(self, procs: list, logs: list[Path]):
        self.procs, self.logs = procs, logs
        _LIVE.append(self)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _code(self, p) -> int | None:
        return p.poll() if isinstance(p, subprocess.Popen) else p.exitcode

    def codes(self) -> list[int | None]:
        """Each rank's exit code, None while it runs."""
        return [self._code(p) for p in self.procs]

    def any_exited(self) -> bool:
        return any(c is not None for c in self.codes())

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to every rank still running (its whole process group where it has one)."""
        for p, code in zip(self.procs, self.codes()):
            if code is not None:
                continue
            try:
                if isinstance(p, subprocess.Popen):
                    os.killpg(p.pid, sig)
                else:
                    os.kill(p.pid, sig)
            except ProcessLookupError:
                pass

    def output(self, rank: int) -> str:
        path = self.logs[rank]
        return path.read_text(errors="replace") if path.is_file() else ""

    def report(self, headline: str) -> str:
        parts = [headline]
        for r, code in enumerate(self.codes()):
            text = self.output(r)
            cut = f"(last {OUTPUT_TAIL} of {len(text)} characters)" if len(text) > OUTPUT_TAIL else ""
            parts.append(f"---- rank {r}: exit code {code} {cut}, {self.logs[r]}\n{text[-OUTPUT_TAIL:]}")
        return "\n".join(parts)

    def _reap(self, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        for p in self.procs:
            left = max(0.1, end - time.monotonic())
            if isinstance(p, subprocess.Popen):
                try:
                    p.wait(left)
                except subprocess.TimeoutExpired:
                    pass
            else:
                p.join(left)

    def wait(self, timeout: float = 300, expect: int | None = 0) -> list[int]:
        """Wait for every rank, at most `timeout` seconds for the group as a whole; returns the exit codes.

        expect: the code every rank must end with (0 by default); the first rank that ends otherwise
        fails the test at once, the others killed. None accepts any code (ranks a test killed itself).
        """
        deadline = time.monotonic() + timeout
        while True:
            codes = self.codes()
            if expect is not None:
                wrong = [(r, c) for r, c in enumerate(codes) if c is not None and c != expect]
                if wrong:
                    self.kill()
                    self._reap()
                    r, c = wrong[0]
                    raise AssertionError(self.report(f"rank {r} exited with {c} (expected {expect}); "
                                                     f"the other ranks were stopped"))
            if all(c is not None for c in codes):
                return codes
            if time.monotonic() > deadline:
                self.kill()
                self._reap()
                raise AssertionError(self.report(f"ranks still running after {timeout} s (hang?): "
                                                 f"{[r for r, c in enumerate(codes) if c is None]}; all killed"))
            time.sleep(0.02)


def launch_ranks(world_size: int, argv: Sequence[str] | Callable[[int], Sequence[str]], log_dir,
                 env: dict | None = None, module: str | None = "calm_pretrain.cli") -> RankGroup:
    """Start `python -m <module> <argv>` as `world_size` ranks (module None: `python <argv>`, e.g.
    ["-c", CODE, ...]); argv may be a function of the rank. Logs append to log_dir/rank<r>.log."""
    port = free_port()
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    for r in range(world_size):
        args = list(argv(r) if callable(argv) else argv)
        cmd = [sys.executable, *(["-m", module] if module else []), *args]
        logs.append(log_dir / f"rank{r}.log")
        with open(logs[-1], "a") as out:
            procs.append(subprocess.Popen(cmd, env=rank_env(r, world_size, port, env), stdout=out,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True))
    return RankGroup(procs, logs)


def _entry(rank: int, world_size: int, port: int, log: str, fn, args) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)  # this rank's prints and its traceback (multiprocessing writes it to stderr) go to its log
    os.dup2(fd, 2)
    os.environ.update(rank_env(rank, world_size, port))
    import torch

    from calm_pretrain.parallel.distributed import shutdown

    torch.set_num_threads(1)
    try:
        fn(rank, world_size, *args)
    finally:
        shutdown()


def run_distributed_test(fn, world_size: int, *args, timeout: float = 300, log_dir=None) -> None:
    """Run `fn(rank, world_size, *args)` in `world_size` spawned gloo processes; any rank failing (or
    the group outliving `timeout`) fails the test with every rank's output."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    own_dir = log_dir is None
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="ranks-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    logs = [log_dir / f"rank{r}.log" for r in range(world_size)]
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, str(logs[r]), fn, args)) for r in range(world_size)]
    for p in procs:
        p.start()
    RankGroup(procs, logs).wait(timeout)
    if own_dir:
        shutil.rmtree(log_dir, ignore_errors=True)
