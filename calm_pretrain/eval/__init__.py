"""Evaluation of trained models: the energy skill score of a CALM's head (`skill`) and the combined
held-out evaluation of any model (`heldout`). Imports the models' numerics (losses, brier), never the
trainer, the parallel engines or the workflows."""
