"""run_demo: the main job's stages in order, each run once (a re-run reuses the finished ones), then the
summary (summary.json, summary.txt and the table in the log)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Optional

from calm_pretrain.demo import stages as st
from calm_pretrain.demo.report import format_summary


def run_demo(run_dir: str | Path = "runs/demo", config: Optional[str | Path] = None, overrides=(),
             steps_scale: float = 1.0, log: Callable[[str], None] = print) -> list[dict]:
    """Run (or finish) the main job in `run_dir`; returns the summary rows (also in summary.json)."""
    ctx = st.prepare(run_dir, config, overrides, steps_scale, log)
    pipe, stage = ctx.pipe, ctx.stages.run
    # Each stage's settings are taken when it starts, after the stages before it (its key chains theirs).
    stage("corpus", lambda: st.corpus(ctx), dataclasses.asdict(pipe.corpus))
    stage("tokenizer", lambda: st.tokenizer(ctx), dataclasses.asdict(pipe.tokenizer))
    stage("tokenize", lambda: st.tokenize(ctx), st.tokenize_settings(ctx))
    stage("autoencoder", lambda: st.autoencoder(ctx), st.training_settings(ctx, "ae"))
    stage("encode", lambda: st.encode(ctx), pipe.encode.dtype)
    stage("calm", lambda: st.language_model(ctx, "calm", "latents"), st.training_settings(ctx, "calm"))
    stage("transformer", lambda: st.language_model(ctx, "transformer", ctx.tr_shards),
          st.training_settings(ctx, "transformer"))
    stage("evaluate", lambda: st.evaluate(ctx), dataclasses.asdict(pipe.eval))
    stage("generate", lambda: st.generate(ctx), dataclasses.asdict(pipe.generate))
    stage("release", lambda: st.export_and_reload(ctx))
    stage("plots", lambda: st.plots(ctx))
    return write_summary(ctx.run, ctx.stages.summary, log)


def write_summary(run: Path, summary: list[dict], log: Callable[[str], None]) -> list[dict]:
    total = round(sum(r.get("seconds", 0.0) for r in summary), 1)
    log("\n" + format_summary(summary))
    (run / "summary.json").write_text(json.dumps({"stages": summary, "total_seconds": total}, indent=1))
    (run / "summary.txt").write_text(format_summary(summary) + "\n")
    return summary
