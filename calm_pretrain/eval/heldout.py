"""The one held-out evaluation of a trained model, used by the trainer's periodic eval, the sweep's
eval stage, the main job and `calm-pretrain eval`: the scores its architecture's spec names
(calm_pretrain/scores.py), from one seed.
"""
from __future__ import annotations

import torch

from calm_pretrain.models.registry import spec_of


@torch.no_grad()
def evaluate_model(model, blocks, ae=None, seed: int = 0, draws: int = 1) -> dict:
    """Every held-out score of `model` on token `blocks` ([B, T] or [T] tensors); a CALM needs its
    frozen autoencoder `ae`. Same seed, same numbers. `draws`: Brier-n from that many independent
    sample draws per block (see brier.evaluate_brier)."""
    return spec_of(model.config).evaluate(model, list(blocks), ae=ae, seed=seed, draws=draws)


def numbers(scores: dict) -> dict:
    """The numeric entries of a result (what a metrics line logs)."""
    return {k: v for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
