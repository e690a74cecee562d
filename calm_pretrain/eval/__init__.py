"""Evaluation and generation of trained models.

  scores, skill   the held-out scores of each kind of model (reconstruction, Brier-n / BrierLM, energy
                  skill): numerics over brier and losses, named by each architecture's spec
  heldout         the one held-out evaluation (the trainer's periodic eval, the sweep, the main job)
  generation      text generation through the sampler the spec names
  source, commands  `calm-pretrain eval` / `generate`: any release, run directory or checkpoint

scores and skill import only the numerics (the models import them); the rest imports the registry, and
source and commands also release and the checkpoint reader; nothing here imports the workflows."""
