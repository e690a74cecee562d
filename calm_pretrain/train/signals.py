"""Preemption: SIGTERM / SIGUSR1 (what Slurm sends before it preempts or times out a job) and a
wall-clock budget become a request to stop; the trainer makes every rank agree on it one step boundary
later (an asynchronous vote, calm_pretrain.parallel.distributed.StopVote), saves a checkpoint and exits with REQUEUE_EXIT_CODE.

The sbatch launchers requeue the job when they see that code; the next launch resumes from `latest`.
"""
from __future__ import annotations

import signal
import threading
import time
from typing import Callable, Optional

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry".
REQUEUE_EXIT_CODE = 75


class StopRequest:
    def __init__(self, exit_after_minutes: float = 0.0, signals=(signal.SIGTERM, signal.SIGUSR1),
                 log: Callable[[str], None] = print):
        self.deadline = time.monotonic() + 60 * exit_after_minutes if exit_after_minutes > 0 else None
        self.log = log
        self.reason: Optional[str] = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.reason is None:
            self.reason = signal.Signals(signum).name
            self.log(f"received {self.reason}: saving a checkpoint at the next step boundary, then exiting "
                     f"with code {REQUEUE_EXIT_CODE} (requeue)")

    def request(self, reason: str) -> None:
        """A stop asked for by the program itself (the launcher is gone): as if a signal had arrived."""
        if self.reason is None:
            self.reason = reason

    def requested(self) -> bool:
        """This rank's view: a signal arrived or the time budget is spent."""
        if self.reason is None and self.deadline is not None and time.monotonic() >= self.deadline:
            self.reason = "time budget (--exit-after-minutes) spent"
            self.log(f"{self.reason}: saving a checkpoint, then exiting with code {REQUEUE_EXIT_CODE}")
        return self.reason is not None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
