"""Running the main job's stages once each (Stages, with their markers) and the project's commands as
subprocesses (run_command), the way a user runs them."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from calm_pretrain.demo.pipeline import REPO


class SettingsChanged(RuntimeError):
    """A finished stage in the run directory was made with other settings."""


class Stages:
    """Runs named stages once; a finished stage leaves `<name>.done.json` with its summary.

    Each stage has a key: a hash of its own settings chained with the previous stage's key, so a change
    anywhere invalidates that stage and every later one. A marker with another key stops the run."""

    def __init__(self, run_dir: Path, log: Callable[[str], None] = print):
        self.run_dir, self.log = run_dir, log
        self.summary: list[dict] = []
        self.key = ""

    def run(self, name: str, fn: Callable[[], dict], settings: Any = None) -> dict:
        self.key = hashlib.sha256(json.dumps([self.key, name, settings], sort_keys=True, default=str)
                                  .encode()).hexdigest()[:16]
        marker = self.run_dir / f"{name}.done.json"
        if marker.is_file():
            result = json.loads(marker.read_text())
            if result.get("key") != self.key:
                raise SettingsChanged(
                    f"{marker}: stage {name!r} finished with other settings than this run's (a changed pipeline "
                    f"config, override or --steps-scale); use a new --run-dir, or delete {name}.done.json and the "
                    f"later stages' markers and outputs to redo them")
            self.log(f"== {name}: done before, reusing ({result.get('metric', '')})")
        else:
            self.log(f"== {name}")
            t0 = time.perf_counter()
            result = fn()
            result["seconds"] = round(time.perf_counter() - t0, 1)
            result["key"] = self.key
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1))
            tmp.replace(marker)
        self.summary.append({"stage": name, **result})
        return result

    def result(self, name: str) -> dict:
        """The result of a stage run (or reused) earlier in this run."""
        return next(r for r in self.summary if r["stage"] == name)


class CommandFailed(RuntimeError):
    pass


def run_command(argv: list[str], log_file: Path, log: Callable[[str], None], *, processes: int = 1,
                threads: Optional[int] = None, echo: Callable[[str], bool] = lambda line: True) -> None:
    """Run `python -m <argv>` (under torchrun with `processes` > 1), output to `log_file`; lines for
    which `echo` is true are also logged. A non-zero exit raises with the log's tail."""
    import torch

    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", *argv]
    else:
        cmd = [sys.executable, "-m", *argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    tail: list[str] = []
    with log_file.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=REPO)
        for line in proc.stdout:
            out.write(line)
            tail = (tail + [line.rstrip()])[-30:]
            if echo(line):
                log("  " + line.rstrip())
        code = proc.wait()
    if code != 0:
        raise CommandFailed(f"{' '.join(cmd)} exited with {code} (log: {log_file}); last lines:\n" + "\n".join(tail))


def run_commands(jobs: list[tuple[list[str], Path]], log: Callable[[str], None], **kw) -> None:
    """`run_command` for independent jobs at once (each is mostly interpreter start-up and imports)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(jobs)) as pool:
        for future in [pool.submit(run_command, argv, log_file, log, **kw) for argv, log_file in jobs]:
            future.result()


def trainer_lines(name: str, every: int = 50) -> Callable[[str], bool]:
    """The trainer's own lines, its step lines only every `every` steps and at the last."""
    import re

    def echo(line: str) -> bool:
        if "Error" in line:
            return True
        if not line.startswith(f"[{name}]"):
            return False
        m = re.search(r"\bstep (\d+)/(\d+) ", line)
        return m is None or int(m.group(1)) % every == 0 or m.group(1) == m.group(2)
    return echo


def exported(line: str) -> bool:
    """The lines of `calm-pretrain export` worth logging: what it exported where."""
    return line.startswith("exported")
