"""Evaluation and generation of trained models.

  heldout         the one held-out evaluation (the trainer's periodic eval, the sweep, the main job)
  generation      text generation through the sampler the spec names
  source, commands  `calm-pretrain eval` / `generate`: any release, run directory or checkpoint

The scores of each kind of model (reconstruction, Brier-n / BrierLM, energy skill) are numerics below
the models (calm_pretrain/scores.py, skill.py: each architecture's spec names its scorer). This package
imports them and the registry, and source and commands also release and the checkpoint reader; nothing
here imports the workflows."""
