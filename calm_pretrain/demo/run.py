"""run_demo: the main job's graph (graph.py) run by the local runner, each stage once (a re-run reuses
the finished ones), then the summary (summary.json, summary.txt and the table in the log)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from calm_pretrain.demo import stages as st
from calm_pretrain.demo.graph import demo_graph
from calm_pretrain.demo.report import format_summary


def run_demo(run_dir: str | Path = "runs/demo", config: Optional[str | Path] = None, overrides=(),
             steps_scale: float = 1.0, log: Callable[[str], None] = print) -> list[dict]:
    """Run (or finish) the main job in `run_dir`; returns the summary rows (also in summary.json)."""
    ctx = st.prepare(run_dir, config, overrides, steps_scale, log)
    # Every stage's settings come from the pipeline and run configs alone, so the whole graph (and every
    # key) is known before the first stage runs.
    summary = ctx.runner.run(demo_graph(ctx))
    return write_summary(ctx.run, summary, log)


def write_summary(run: Path, summary: list[dict], log: Callable[[str], None]) -> list[dict]:
    total = round(sum(r.get("seconds", 0.0) for r in summary), 1)
    log("\n" + format_summary(summary))
    (run / "summary.json").write_text(json.dumps({"stages": summary, "total_seconds": total}, indent=1))
    (run / "summary.txt").write_text(format_summary(summary) + "\n")
    return summary
