"""Shared by the Slurm stand-ins (srun, sbatch, scontrol, scancel) that tests put first on PATH.

They implement only what slurm/*.sbatch and tests/test_slurm.py use, on one machine: a "node" is a
name in the job's node list, every task runs here. State lives in $SLURM_STANDIN_DIR:
  requeued          one line per `scontrol requeue JOBID` (the job id)
  jobs/<id>.pid     the pid of job <id>'s batch shell (for `scancel --batch`)
  next_job_id       the job id counter
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path


def state_dir() -> Path:
    d = os.environ.get("SLURM_STANDIN_DIR")
    if not d:
        sys.exit(f"{Path(sys.argv[0]).name} (stand-in): SLURM_STANDIN_DIR is not set")
    path = Path(d)
    (path / "jobs").mkdir(parents=True, exist_ok=True)
    return path


def requeued(job_id: str) -> int:
    """How many times job_id has been requeued."""
    f = state_dir() / "requeued"
    return f.read_text().split().count(job_id) if f.is_file() else 0


def expand_hostlist(text: str) -> list[str]:
    """Slurm's hostlist syntax: 'node[01-03,07],gpu5' -> node01 node02 node03 node07 gpu5."""
    parts, depth, cur = [], 0, ""
    for ch in text.strip():
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += (ch == "[") - (ch == "]")
        cur += ch
    parts.append(cur)
    return [host for part in parts if part for host in _expand(part)]


def _expand(part: str) -> list[str]:
    m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
    if not m:
        return [part]
    prefix, ranges, rest = m.groups()
    out = []
    for r in ranges.split(","):
        lo, _, hi = r.partition("-")
        for i in range(int(lo), int(hi or lo) + 1):
            out += [f"{prefix}{i:0{len(lo)}d}{tail}" for tail in _expand(rest)]
    return out


def parse_options(argv: list[str], with_value: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Options up to the first argument that is not one: --name=value, --name value or -X value for the
    names in with_value (short or long -> canonical name); other options are accepted and ignored
    (an unknown option given as '--name value' would swallow nothing: use --name=value)."""
    opts, i = {}, 0
    while i < len(argv) and argv[i].startswith("-"):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in with_value:
            if not eq:
                i += 1
                value = argv[i]
            opts[with_value[name]] = value
        i += 1
    return opts, argv[i:]
