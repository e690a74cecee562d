"""The local runner: a graph's stages run once each in a run directory, here, in order. A finished stage
leaves `<name>.done.json` (its result, its time, its key), and a re-run reuses it; its commands run as
subprocesses, the way a user runs them (run_command)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from calm_pretrain.workflow.stage import Command, Graph, Stage
from data_pipeline.files import atomic_write_json

REPO = Path(__file__).resolve().parents[2]  # the commands run from the repository root, as a user's do


class SettingsChanged(RuntimeError):
    """A finished stage in the run directory was made with other settings."""


class CommandFailed(RuntimeError):
    pass


def chain_key(previous: str, name: str, settings: Any) -> str:
    """A stage's done-key: its settings hashed with the previous stage's key, so a change anywhere
    invalidates that stage and every later one (the hash the main job's markers have always held)."""
    return hashlib.sha256(json.dumps([previous, name, settings], sort_keys=True, default=str)
                          .encode()).hexdigest()[:16]


class LocalRunner:
    """Runs stages once each in `run_dir`. The key chains every stage run before it in this runner, in
    the graph's order, not only the ones it needs: a marker with another key stops the run."""

    def __init__(self, run_dir: Path, log: Callable[[str], None] = print, *, cause: str = "",
                 new_dir: str = "a new run directory"):
        # cause, new_dir: what the SettingsChanged message names as the likely change and the way out
        self.run_dir, self.log, self.cause, self.new_dir = Path(run_dir), log, cause, new_dir
        self.summary: list[dict] = []  # one row per stage run or reused: {"stage": name, **result}
        self.key = ""

    def run(self, graph: Graph) -> list[dict]:
        """Every stage of the graph in order; returns the summary rows."""
        for stage in graph:
            self.run_stage(stage)
        return self.summary

    def run_stage(self, stage: Stage) -> dict:
        missing = [n for n in stage.needs if not any(r["stage"] == n for r in self.summary)]
        if missing:
            raise RuntimeError(f"stage {stage.name!r} needs {', '.join(missing)}, not run yet by this runner")
        name = stage.name
        self.key = chain_key(self.key, name, stage.settings)
        marker = self.run_dir / f"{name}.done.json"
        if marker.is_file():
            result = json.loads(marker.read_text())
            if result.get("key") != self.key:
                raise SettingsChanged(
                    f"{marker}: stage {name!r} finished with other settings than this run's"
                    f"{f' ({self.cause})' if self.cause else ''}; use {self.new_dir}, or delete {name}.done.json "
                    "and the later stages' markers and outputs to redo them")
            self.log(f"== {name}: done before, reusing ({result.get('metric', '')})")
        else:
            self.log(f"== {name}")
            t0 = time.perf_counter()
            result = self._execute(stage)
            result["seconds"] = round(time.perf_counter() - t0, 1)
            result["key"] = self.key
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(marker, result)  # whole or not at all: a cut-off stage runs again
        self.summary.append({"stage": name, **result})
        return result

    def _execute(self, stage: Stage) -> dict:
        if stage.prepare is not None:
            stage.prepare()
        jobs = [(c, c.log or self.run_dir / "logs" / f"{stage.name}.log") for c in stage.commands]
        if stage.concurrent and len(jobs) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(len(jobs)) as pool:
                futures = [pool.submit(run_command, list(c.argv), log, self.log, **_options(c)) for c, log in jobs]
                for future in futures:
                    future.result()
        else:
            for c, log in jobs:
                run_command(list(c.argv), log, self.log, **_options(c))
        return dict(stage.result()) if stage.result is not None else {}

    def result(self, name: str) -> dict:
        """The result of a stage run (or reused) earlier by this runner."""
        return next(r for r in self.summary if r["stage"] == name)


def _options(c: Command) -> dict:
    return {"processes": c.processes, "threads": c.threads, **({"echo": c.echo} if c.echo else {})}


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

