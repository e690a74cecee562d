"""The held-out scores of each kind of model, every number with its standard error, from one seed.
Each architecture's spec (calm_pretrain/models/registry.py) names the function that scores it:

  reconstruction  the autoencoder: token accuracy from the posterior mean, clean and with Gaussian noise
                  of std sigma added to it (a small robustness curve)
  calm_scores     Brier-1..4 and BrierLM (two-sample estimator at chunk starts), the energy skill score
                  against the marginal predictor, and the decoded-token accuracy of one head sample
  lm_scores       a next-token LM: Brier-1..4 and BrierLM (variance-reduced estimator at every position)
"""
from __future__ import annotations

import torch

from calm_pretrain.brier import evaluate_brier
from calm_pretrain.skill import calm_skill

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
def lm_scores(model, blocks, ae=None, seed: int = 0, draws: int = 1) -> dict:
    """Brier-n and BrierLM of a next-token LM (`ae` is not used)."""
    return evaluate_brier(model, blocks, generator=torch.Generator().manual_seed(seed), draws=draws)


@torch.no_grad()
def calm_scores(model, blocks, ae=None, seed: int = 0, draws: int = 1) -> dict:
    """Brier-n and BrierLM of a CALM sampled through its frozen autoencoder `ae`, and its energy skill."""
    if ae is None:
        raise ValueError("a CALM is scored with its frozen autoencoder: none was given")
    ae = ae.to(next(model.parameters()).device)
    scores = evaluate_brier(model, blocks, ae=ae, generator=torch.Generator().manual_seed(seed), draws=draws)
    scores.update(calm_skill(model, ae, blocks, generator=torch.Generator().manual_seed(seed + 1)))
    return scores


@torch.no_grad()
def autoencoder_scores(model, blocks, ae=None, seed: int = 0, draws: int = 1) -> dict:
    """The autoencoder's reconstruction scores (`ae` and `draws` are not used)."""
    return reconstruction(model, blocks, seed)
