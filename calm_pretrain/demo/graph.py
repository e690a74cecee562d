"""The main job as a workflow graph (calm_pretrain/workflow): each stage's commands (the project's own,
as a user runs them), the stages it needs, what it reads and makes, and the settings its done-key
hashes; its in-process work is in stages.py.

The stages and their settings are the ones the main job's markers have always been keyed by, in the
same order, so a run directory from before carries on. corpus, evaluate, generate and plots are
in-process only, so the graph runs locally (LocalRunner), not as Slurm jobs."""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

from calm_pretrain.demo import stages as st
from calm_pretrain.workflow import Command, Graph, Stage


def trainer_lines(name: str, every: int = 50) -> Callable[[str], bool]:
    """The trainer's own lines, its step lines only every `every` steps and at the last."""
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


def _train_command(ctx: st.DemoContext, name: str) -> Command:
    stage, cfg = getattr(ctx.pipe.stages, name), ctx.cfgs[name]
    return Command(("calm_pretrain.cli", "train", "--config", str(ctx.run / "configs" / f"{name}.yaml")),
                   ctx.run / "logs" / f"{name}.log", stage.processes, stage.threads, echo=trainer_lines(cfg.name))


def _export(ctx: st.DemoContext, name: str, *extra: str) -> Command:
    return Command(("calm_pretrain.cli", "export", "--checkpoint", str(ctx.run / name), "--out",
                    str(ctx.release / name), "--tokenizer", ctx.tok_spec, *extra),
                   ctx.run / "logs" / f"export_{name}.log", echo=exported)


def _model_stage(ctx: st.DemoContext, stage: str, name: str, shards: str, eval_shards: str, needs: tuple,
                 **kw) -> Stage:
    """A model's stage: its config written, `calm-pretrain train` on `shards` (and what else `kw` adds)."""
    return Stage(stage, commands=[_train_command(ctx, name), *kw.pop("commands", ())], needs=needs,
                 outputs=[ctx.run / name, ctx.run / "configs" / f"{name}.yaml", *kw.pop("outputs", ())],
                 settings=st.training_settings(ctx, name), prepare=lambda: st.write_train_config(ctx, name, shards, eval_shards), **kw)


def demo_graph(ctx: st.DemoContext) -> Graph:
    """The main job's stages in the order they run."""
    pipe, run, data, release = ctx.pipe, ctx.run, ctx.data, ctx.release
    e = pipe.encode
    tok_cmd = [Command(("data_pipeline.cli", "demo-tokenizer", ctx.tok_spec, "--vocab-size",
                        str(pipe.tokenizer.vocab_size), "--corpus", *ctx.train_inputs, "--text-field",
                        pipe.corpus.text_field), run / "logs" / "tokenizer.log")] if pipe.tokenizer.spec == "train" else []
    jobs = st.tokenize_jobs(ctx)
    return Graph([
        # No inputs listed: a corpus other than stdlib is what calm-data tokenize reads (files, globs or a hub
        # dataset name), not paths.
        Stage("corpus", settings=dataclasses.asdict(pipe.corpus), result=lambda: st.corpus(ctx),
              outputs=[run / "corpus"] if ctx.stdlib else []),
        Stage("tokenizer", commands=tok_cmd, needs=("corpus",), settings=dataclasses.asdict(pipe.tokenizer),
              result=lambda: st.tokenizer(ctx), outputs=[ctx.tok_spec] if tok_cmd else []),
        Stage("tokenize", commands=[Command(argv, run / "logs" / f"tokenize_{name}.log") for name, argv in jobs.items()],
              concurrent=True,  # independent, and each is mostly interpreter start-up and imports
              needs=("tokenizer",), settings=st.tokenize_settings(ctx), outputs=[data / name for name in jobs],
              result=lambda: st.tokenize(ctx)),
        # The release is the autoencoder from here on: it encodes the data, CALM's ae_path names it.
        _model_stage(ctx, "autoencoder", "ae", "ae_tokens", "heldout", ("tokenize",),
                     commands=[_export(ctx, "ae")], outputs=[release / "ae"], result=lambda: st.autoencoder(ctx)),
        Stage("encode", commands=[Command(("data_pipeline.cli", "encode", str(data / "lm_tokens"), "--ae",
                                           str(release / "ae"), "-o", str(data / "latents"), "--dtype", e.dtype,
                                           "--no-progress"), run / "logs" / "encode.log", e.processes, e.threads)],
              needs=("tokenize", "autoencoder"), settings=e.dtype, outputs=[data / "latents"],
              result=lambda: st.encode(ctx)),
        _model_stage(ctx, "calm", "calm", "latents", "heldout", ("encode", "autoencoder"),
                     result=lambda: st.language_model(ctx, "calm")),
        _model_stage(ctx, "transformer", "transformer", ctx.tr_shards, ctx.tr_heldout, ("tokenize",),
                     result=lambda: st.language_model(ctx, "transformer")),
        Stage("evaluate", needs=("tokenize", "autoencoder", "calm", "transformer"),
              settings=dataclasses.asdict(pipe.eval), outputs=[run / "eval.json"], result=lambda: st.evaluate(ctx)),
        Stage("generate", needs=("tokenizer", "autoencoder", "calm", "transformer"),
              settings=dataclasses.asdict(pipe.generate), outputs=[run / "samples.json"],
              result=lambda: st.generate(ctx)),
        Stage("release", commands=[_export(ctx, "calm", "--embed-ae", str(release / "ae")),
                                   _export(ctx, "transformer")],
              concurrent=True, needs=("autoencoder", "calm", "transformer"),
              outputs=[release / "calm", release / "transformer"], result=lambda: st.reload_releases(ctx)),
        Stage("plots", needs=("autoencoder", "calm", "transformer"), outputs=[run / "plots" / "training.png"],
              result=lambda: st.plots(ctx)),
    ])
