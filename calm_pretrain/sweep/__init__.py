"""Scaling-law sweeps: plan a grid of runs, submit it as Slurm job arrays, collect, fit and plot.

One module per step, the command line apart (its --help, in cli.py, documents the sweep file format):

  plan.py      a sweep file → a plan directory: resolved configs, plan.json
  submit.py    the plan's stages as a workflow graph; its submit.sh and stage scripts (the Slurm runner)
  evaluate.py  the eval stage (final BrierLM of every point) and the AE export stage
  collect.py   metrics.jsonl of every point → the runs and steps tables
  fit.py       a score against training FLOPs per group
  plot.py      the figures
  cli.py       `calm-sweep` (also `python -m calm_pretrain.sweep` and tools/sweep.py)

A workflow: it imports the config, the registry (what each architecture needs: an autoencoder, its
sample length, its label), the evaluation and calm_pretrain/workflow (the stage description and its
Slurm runner), and runs training as the same commands a user runs.
No library package imports it.
"""
from calm_pretrain.sweep.cli import main
from calm_pretrain.sweep.collect import EVAL_FILE, FINAL_SCORES, collect, read_records, read_tables, write_tables
from calm_pretrain.sweep.errors import SweepError
from calm_pretrain.sweep.evaluate import evaluate_plan, evaluate_point, export_autoencoder
from calm_pretrain.sweep.fit import FIT_FORMS, fit, predict
from calm_pretrain.sweep.plan import SWEEP_KEYS, make_plan, sample_tokens_of
from calm_pretrain.sweep.plot import HEAD_PANELS, STUDY_PANELS, plot, plot_heads, plot_study
from calm_pretrain.sweep.submit import REPO

__all__ = ["EVAL_FILE", "FINAL_SCORES", "FIT_FORMS", "HEAD_PANELS", "REPO", "STUDY_PANELS", "SWEEP_KEYS", "SweepError",
           "collect", "evaluate_plan", "evaluate_point", "export_autoencoder", "fit", "main", "make_plan", "plot",
           "plot_heads", "plot_study", "predict", "read_records", "read_tables", "sample_tokens_of", "write_tables"]
