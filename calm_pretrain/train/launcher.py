"""`calm-pretrain launch`: torchrun with the requeue code and preemption signals intact.

torchrun on its own breaks both: it reports a worker's exit 75 (saved, requeue me) as 1, answers
SIGTERM by SIGKILLing its workers 30 s later (mid-save for a large model) and dies of SIGUSR1. And
its workers run in sessions of their own, so a ``kill -9`` of torchrun leaves them training.

    calm-pretrain launch --standalone --nproc-per-node 8 -- train --config configs/calm/calm_m.yaml

runs ``torchrun <options> -m calm_pretrain.cli <command>`` in a session of its own (a terminal's or
a job's signal to the group reaches this wrapper only) and

* relays SIGTERM / SIGUSR1 / SIGINT to the workers directly (never to torchrun) as SIGUSR1: they agree
  at the next step boundary, save and exit 75;
* exits 75 when the workers did: each worker writes its exit code to ``$CALM_LAUNCH_DIR/rank_N.exit``
  (and its pid to ``rank_N.pid``, for the relay); 75 from some ranks and none that failed is 75,
  whatever torchrun returns (it SIGTERMs the last ranks as soon as the first one exits);
* dies with its torchrun: torchrun gets SIGTERM if the wrapper itself is killed (PR_SET_PDEATHSIG).

Worker side (:class:`WorkerSession`, under any torchrun): a thread watches the parent process; when
torchrun is gone (killed with -9, say) the worker is reparented, requests a stop, saves at the next
step boundary and exits instead of training on unsupervised.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Optional

from calm_pretrain.train.signals import REQUEUE_EXIT_CODE

LAUNCH_DIR_ENV = "CALM_LAUNCH_DIR"
PARENT_POLL_S = 1.0
PR_SET_PDEATHSIG = 1


# ---- worker side -----------------------------------------------------------------------------
class WorkerSession:
    """Under torchrun: watch the launcher; under `calm-pretrain launch` also report pid and exit code."""

    def __init__(self, stop, log: Callable[[str], None] = print):
        self.dir = Path(os.environ[LAUNCH_DIR_ENV]) if os.environ.get(LAUNCH_DIR_ENV) else None
        from calm_pretrain.parallel.distributed import env_rank  # the worker side: torch is loaded already

        self.rank = str(env_rank())
        self._done = threading.Event()
        if self.dir is not None:
            (self.dir / f"rank_{self.rank}.pid").write_text(str(os.getpid()))
        if "TORCHELASTIC_RUN_ID" in os.environ:  # set by torchrun for its workers only
            parent = os.getppid()
            threading.Thread(target=self._watch, args=(parent, stop, log), name="launcher-watch", daemon=True).start()

    def _watch(self, parent: int, stop, log) -> None:
        # Polling, not PR_SET_PDEATHSIG: that fires when the *thread* that started us exits, and which of
        # torchrun's threads starts its workers is not ours to rely on.
        while not self._done.wait(PARENT_POLL_S):
            if os.getppid() != parent:
                log(f"the launcher (pid {parent}) is gone: saving at the next step boundary, then exiting")
                stop.request(f"launcher pid {parent} gone")
                return

    def close(self, code: int) -> None:
        self._done.set()
        if self.dir is not None:
            try:
                (self.dir / f"rank_{self.rank}.exit").write_text(str(code))
            except OSError:
                pass  # the launcher is gone with its directory: nobody is left to read it


# ---- launcher side ---------------------------------------------------------------------------
def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the wrapper dies (Linux; elsewhere nothing)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def outcome(torchrun_code: int, rank_codes: list[int]) -> int:
    """The launch's exit code: 75 when ranks saved for a requeue and none failed, else torchrun's."""
    if REQUEUE_EXIT_CODE in rank_codes and set(rank_codes) <= {0, REQUEUE_EXIT_CODE}:
        return REQUEUE_EXIT_CODE
    return torchrun_code


def launch(torchrun_args: list[str], command: list[str], log: Callable[[str], None] = print) -> int:
    run_dir = Path(tempfile.mkdtemp(prefix="calm-launch-"))
    env = {**os.environ, LAUNCH_DIR_ENV: str(run_dir)}
    argv = [sys.executable, "-m", "torch.distributed.run", *torchrun_args, "-m", "calm_pretrain.cli", *command]
    child = subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=_die_with_parent)
    relayed: list[str] = []

    def relay(signum, frame) -> None:
        relayed.append(signal.Signals(signum).name)
        log(f"calm-pretrain launch: received {relayed[-1]}: asking every worker to save and exit "
            f"{REQUEUE_EXIT_CODE} (SIGUSR1)")
        for pid_file in run_dir.glob("rank_*.pid"):
            try:
                os.kill(int(pid_file.read_text()), signal.SIGUSR1)
            except (OSError, ValueError):
                pass  # already gone

    previous = {sig: signal.signal(sig, relay) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    rank_codes = [int(f.read_text() or 1) for f in sorted(run_dir.glob("rank_*.exit"))]
    shutil.rmtree(run_dir, ignore_errors=True)
    result = outcome(code, rank_codes)
    if result != code:
        log(f"calm-pretrain launch: the workers exited {sorted(set(rank_codes))} (torchrun returned {code}); "
            f"exiting {result}")
    return result


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """`[torchrun options] -- command...` -> (options, command)."""
    if "--" not in argv:
        raise ValueError("usage: calm-pretrain launch [torchrun options] -- train --config CONFIG [overrides]")
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def main(argv: Optional[list[str]] = None) -> int:
    options, command = split_argv(list(sys.argv[1:] if argv is None else argv))
    return launch(options, command)


if __name__ == "__main__":
    sys.exit(main())
