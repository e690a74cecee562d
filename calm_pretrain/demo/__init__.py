"""The main job: raw English text → tokenizer → autoencoder → latent shards → CALM and a Transformer
baseline → BrierLM, samples, release checkpoints, reloaded for one generation.

A pipeline config (``configs/demo.yaml`` by default) names the corpus, the tokenizer and one ordinary
``calm-pretrain train`` config per model. Each stage runs the project's own commands as subprocesses
(``calm-data demo-tokenizer / tokenize / encode``, ``calm-pretrain train`` — under torchrun when a stage
asks for several processes — and ``calm-pretrain export``), with the resolved run config written to
``<run-dir>/configs/<stage>.yaml`` first, so the demo exercises exactly what a real run uses.

Every stage leaves ``<stage>.done.json`` with its numbers (and a key of the settings it ran with) last;
a re-run skips finished stages, and refuses a run directory whose finished stages were made with other
settings. The run directory ends up holding ``summary.json`` (the table printed at the end), each model's
``metrics.jsonl``, ``plots/training.png``, ``release/{ae,calm,transformer}``, ``samples.json`` and
``eval.json``.

One module per concern: pipeline.py (the pipeline config), graph.py (the stages as a workflow graph:
their commands, needs, outputs and settings), stages.py (their in-process work, each a function of a
DemoContext), report.py (metrics read back, the plot, the results table and summary), run.py (run_demo:
the graph through the local runner, which keeps the markers and runs the commands as subprocesses).

A workflow: it imports the config, the evaluation and calm_pretrain/workflow (the stage description and
its local runner), and runs everything else as subprocess commands; no library package imports it.
"""
from calm_pretrain.demo.pipeline import (DEFAULT_PIPELINE, MODELS, REPO, CorpusSection, EncodeSection, EvalSection,
                                         GenerateSection, PipelineConfig, StageSection, StagesSection, TokenizeSection,
                                         TokenizerSection, load_pipeline)
from calm_pretrain.demo.report import format_summary, plot_training, read_metrics, results_table
from calm_pretrain.demo.run import run_demo
from calm_pretrain.demo.graph import demo_graph
from calm_pretrain.demo.stages import DemoContext, load_trained
from calm_pretrain.workflow import CommandFailed, SettingsChanged

__all__ = ["DEFAULT_PIPELINE", "MODELS", "REPO", "CommandFailed", "CorpusSection", "DemoContext", "EncodeSection",
           "EvalSection", "GenerateSection", "PipelineConfig", "SettingsChanged", "StageSection",
           "StagesSection", "TokenizeSection", "TokenizerSection", "demo_graph", "format_summary", "load_pipeline",
           "load_trained", "plot_training", "read_metrics", "results_table", "run_demo"]
