"""One live run per output directory: a lock file in it, ``train.lock``.

Without it a second launch into a directory that a live run is writing deletes the other's
``step_N.partial``, interleaves two schedules in ``metrics.jsonl`` and mixes checkpoints of both.

Which locking, and why. Run directories live on shared filesystems (NFS, Lustre, GPFS) and the two
launches may be on different nodes, so the lock must be visible across nodes:

* ``flock``/``fcntl`` locks are not dependable there: on NFS they go through the lock daemon (NLM,
  lost on a server restart, often disabled) or are silently node-local (``local_lock=all``); Lustre
  mounted with ``localflock`` (a common default) keeps them per node, and without ``flock`` refuses
  them. A second node would then see no lock at all.
* Creating a file with ``O_CREAT | O_EXCL`` is atomic on the server on NFSv3+, Lustre and GPFS: of two
  launches exactly one creates it. That is what this module relies on.

A lock file cannot vanish with its process, so it says whose it is (host, pid and the pid's start
time, start time, Slurm job id) and carries a heartbeat: its mtime, refreshed every ``HEARTBEAT_S``
by a daemon thread. It is stale, and taken over with a warning, when
  * its host is this host and its process is gone (or the pid now belongs to another process);
  * it holds this Slurm job id (a requeued job: Slurm runs one instance of a job id at a time);
  * it is from another host and its heartbeat is older than ``STALE_S``.
Taking over renames the stale file to a unique name first (atomic: of two launches taking over the
same stale lock only one rename succeeds), then creates the lock with ``O_EXCL`` again.

Under torchrun/srun only rank 0 takes the lock; its outcome is broadcast, so every rank starts or
every rank refuses with the same message.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

from calm_pretrain.errors import CheckpointError

LOCK_NAME = "train.lock"
HEARTBEAT_S = 30.0
STALE_S = 600.0  # a lock of another host with an older heartbeat is stale (20 missed beats)


class RunDirectoryLocked(CheckpointError):
    pass


def _process_start(pid: int) -> Optional[str]:
    """The kernel's start time of `pid` (Linux /proc), to tell a live run from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else fields[19]  # a zombie is gone; field 22 of stat: starttime


def _alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    now = _process_start(pid)
    if Path("/proc").is_dir() and now is None:
        return False
    return start is None or now is None or now == start


def _describe(holder: dict) -> str:
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}{job}"


class RunLock:
    def __init__(self, out_dir: Path, log: Callable[[str], None] = print):
        self.path = Path(out_dir) / LOCK_NAME
        self.log = log
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def acquire(self) -> None:
        """Take the lock, or raise RunDirectoryLocked naming its live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock moved away by another launch at the same moment: try again
            if self._create():
                self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
                self._thread.start()
                return
            holder, age = self._read()
            why = self._stale_reason(holder, age)
            if why is None:
                raise RunDirectoryLocked(
                    f"{self.path.parent}: another run is using this output directory ({_describe(holder)}; "
                    f"lock file {self.path}, heartbeat {age:.0f} s ago); refusing to start a second run into it "
                    f"(wait for it to end, or set another train.output_dir)")
            moved = self.path.with_name(f"{LOCK_NAME}.stale-{self.token}")
            try:
                os.rename(self.path, moved)
            except FileNotFoundError:
                continue
            moved.unlink()
            self.log(f"WARNING: took over the stale lock {self.path} of a run that is gone ({_describe(holder)}: {why})")
        raise RunDirectoryLocked(f"{self.path}: could not take the lock (other launches keep replacing it)")

    def _create(self) -> bool:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
              "token": self.token}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self) -> tuple[dict, float]:
        """(what the lock file says, seconds since its heartbeat)."""
        try:
            age = time.time() - self.path.stat().st_mtime
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}, 0.0
        except (OSError, ValueError):  # being written right now, or garbage: judged by its heartbeat
            return {}, age
        return (holder if isinstance(holder, dict) else {}), age

    def _stale_reason(self, holder: dict, age: float) -> Optional[str]:
        if not holder:
            return f"unreadable lock file, no heartbeat for {age:.0f} s" if age > STALE_S else None
        if holder.get("host") == socket.gethostname():
            if not _alive(int(holder.get("pid", 0)), holder.get("pid_start")):
                return "its process no longer runs"
            return None
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("slurm_job_id") == job:
            return f"it is this Slurm job {job}, requeued"
        if age > STALE_S:
            return f"no heartbeat for {age:.0f} s"
        return None

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # a slow or briefly unreachable filesystem: the next beat tries again

    def release(self) -> None:
        """Remove the lock if it is still ours (never a lock another launch took over)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder, _ = self._read()
        if holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)


def lock_run_directory(out_dir: Path, rank: int, log: Callable[[str], None] = print) -> Optional[RunLock]:
    """Rank 0 takes the lock; every rank raises the same RunDirectoryLocked if it could not."""
    from calm_pretrain.parallel.distributed import broadcast_object

    lock, refusal = None, None
    if rank == 0:
        lock = RunLock(out_dir, log)
        try:
            lock.acquire()
        except RunDirectoryLocked as e:
            lock, refusal = None, str(e)
    refusal = broadcast_object(refusal)
    if refusal:
        raise RunDirectoryLocked(refusal)
    return lock
