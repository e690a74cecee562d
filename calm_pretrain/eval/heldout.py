"""The one held-out evaluation of a trained model, used by the trainer's periodic eval, the sweep's
eval stage and the main job: every number with its standard error, from one seed.

  autoencoder  token reconstruction accuracy from the posterior mean, clean and with Gaussian noise of
               std sigma added to it (a small robustness curve)
  calm         Brier-1..4 and BrierLM (two-sample estimator at chunk starts), the energy skill score
               against the marginal predictor, and the decoded-token accuracy of one head sample
  transformer  Brier-1..4 and BrierLM (variance-reduced estimator at every position)
"""
from __future__ import annotations

from typing import Optional

import torch

from calm_pretrain.brier import evaluate_brier
from calm_pretrain.eval.skill import calm_skill

NOISE_SIGMAS = (0.1, 0.2, 0.3, 0.5)  # the autoencoder's robustness curve


@torch.no_grad()
def reconstruction(ae, blocks, seed: int = 0, sigmas=NOISE_SIGMAS) -> dict:
    """Accuracy of argmax(decode(mu)) and of argmax(decode(mu + sigma·ε)) for each sigma."""
    gen = torch.Generator().manual_seed(seed)
    device = next(ae.parameters()).device
    correct, noisy, total = 0, {s: 0 for s in sigmas}, 0
    for ids in blocks:
        ids = torch.as_tensor(ids, device=device)
        ids = ids[None] if ids.dim() == 1 else ids
        mu, _ = ae.encode(ids)
        correct += int((ae.decode(mu).argmax(-1) == ids).sum())
        for s in sigmas:
            noise = s * torch.randn(mu.shape, generator=gen).to(device=device, dtype=mu.dtype)
            noisy[s] += int((ae.decode(mu + noise).argmax(-1) == ids).sum())
        total += ids.numel()
    if not total:
        raise ValueError("no evaluation block to reconstruct")
    return {"accuracy": correct / total, **{f"accuracy_noise_{s:g}": n / total for s, n in noisy.items()},
            "tokens": total}


@torch.no_grad()
def evaluate_model(model, blocks, ae=None, seed: int = 0, draws: int = 1) -> dict:
    """Every held-out score of `model` on token `blocks` ([B, T] or [T] tensors); a CALM needs its
    frozen autoencoder `ae`. Same seed, same numbers. `draws`: Brier-n from that many independent
    sample draws per block (see brier.evaluate_brier)."""
    blocks = list(blocks)
    arch = model.config.arch
    if arch == "autoencoder":
        return reconstruction(model, blocks, seed)
    if arch == "calm" and ae is None:
        raise ValueError("a CALM is scored with its frozen autoencoder: none was given")
    if ae is not None:
        ae = ae.to(next(model.parameters()).device)
    scores = evaluate_brier(model, blocks, ae=ae if arch == "calm" else None,
                            generator=torch.Generator().manual_seed(seed), draws=draws)
    if arch == "calm":
        scores.update(calm_skill(model, ae, blocks, generator=torch.Generator().manual_seed(seed + 1)))
    return scores


def numbers(scores: dict) -> dict:
    """The numeric entries of a result (what a metrics line logs)."""
    return {k: v for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
