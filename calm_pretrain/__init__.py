"""calm-pretrain: distributed pretraining of Continuous Autoregressive Language Models.

Packages, from the bottom of the import order to the top (a package imports only those above it):

  schema, flops, losses, brier, sampling   the numerics and the config machinery: torch only
  eval.scores, eval.skill                  held-out scores of each kind of model (numerics)
  models                                   one package per architecture + the registry (spec_of)
  config                                   the run config; looks architectures up in the registry
  data_pipeline (a sibling package)        shards, manifests, the loader, the frozen-AE encoder
  parallel                                 engines (plain, ZeRO, pipeline), TP, process groups
  train                                    the trainer, checkpoints, signals, the run entry point
  release, eval (commands, source)         release checkpoints; `calm-pretrain eval / generate`
  workflow                                 the workflows' stage description; local and Slurm runners
  demo, sweep, cli                         the workflows and the console scripts
"""
__version__ = "0.1.0"
