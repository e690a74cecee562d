"""Energy skill: does a CALM use its context? A proper score that moves long before BrierLM does.

For each scored position i (a chunk whose predecessor is in the block) the target is the frozen AE's
posterior Q_i = N(mu_i, sigma_i²) of the true next chunk. A predictor P is scored with the energy
score in the training loss's convention (lower is better, alpha = 1):

    ES(P, Q_i) = 2·E‖X − Y‖ − E‖X − X'‖,    X, X' ~ P,  Y ~ Q_i,

estimated without bias from N samples of P and M samples of Q_i (the U-statistic of the energy loss).
It is minimised in expectation by P = Q_i (strictly proper for alpha in (0, 2)).

The reference predictor is the *marginal*: it ignores the context and samples the posterior of a
uniformly drawn *other* scored position of the same eval set (a fresh draw for every sample). It is
scored against the very same target samples, so the two scores are paired. The energy skill is

    skill = 1 − mean_i ES(model_i) / mean_i ES(marginal_i),

> 0 when the model's predictions are closer to the truth than the eval set's own distribution of
chunks, 0 in expectation for a model that samples the marginal, at most 1 − ES(Q)/ES(marginal) for a
model that samples the true posterior. Standard errors are over positions (the delta method for the
ratio), clustered by eval block: the positions of one block share a document and are not independent.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from calm_pretrain.brier import ratio_standard_error
from calm_pretrain.losses import energy_loss


def posterior_draws(mu: torch.Tensor, log_sigma: torch.Tensor, num_samples: int,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[P, d] posteriors → [P, num_samples, d] draws, in float64 (scores are reduced in float64)."""
    mu, sigma = mu.double(), log_sigma.double().exp()
    eps = torch.randn((*mu.shape[:-1], num_samples, mu.shape[-1]), generator=generator, dtype=torch.float64)
    return mu[..., None, :] + sigma[..., None, :] * eps


def marginal_draws(mu: torch.Tensor, log_sigma: torch.Tensor, num_samples: int,
                   generator: Optional[torch.Generator] = None, start: int = 0,
                   end: Optional[int] = None) -> torch.Tensor:
    """The marginal predictor's samples [end − start, num_samples, d] for positions start:end of a pool
    of posteriors [P, d]: each draw is from the posterior of a uniformly drawn *other* position."""
    p = mu.shape[0]
    end = p if end is None else end
    if p < 2:
        raise ValueError("the marginal predictor needs at least 2 scored positions")
    offset = torch.randint(1, p, (end - start, num_samples), generator=generator)  # never the position itself
    other = (torch.arange(start, end)[:, None] + offset) % p
    eps = torch.randn((end - start, num_samples, mu.shape[-1]), generator=generator, dtype=torch.float64)
    return mu.double()[other] + log_sigma.double().exp()[other] * eps


def energy_scores(samples: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position unbiased energy score [P] of samples [P, N, d] against targets [P, M, d]."""
    return energy_loss(samples.double(), targets=targets.double())


def _mean_se(x: torch.Tensor) -> tuple[float, float]:
    n = x.numel()
    return float(x.mean()), (float(x.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.nan)


def skill_summary(model: torch.Tensor, marginal: torch.Tensor, blocks: Optional[torch.Tensor] = None) -> dict:
    """Paired per-position scores [P] (model, marginal) → means, standard errors and the skill.

    With `blocks` (the eval block of every position, [P]) and at least two blocks, the standard errors
    are clustered by block (ratio_standard_error); else positions are treated as independent (the
    delta method for mean(model) / mean(marginal))."""
    model, marginal = model.double().flatten(), marginal.double().flatten()
    n = model.numel()
    es, es_se = _mean_se(model)
    ms, ms_se = _mean_se(marginal)
    ratio = es / ms
    if blocks is not None and int(blocks.max()) >= 1:
        g = int(blocks.max()) + 1
        sums = torch.zeros(g, 3, dtype=torch.float64).index_add_(
            0, blocks, torch.stack([model, marginal, torch.ones_like(model)], -1))
        skill_se = float(ratio_standard_error(sums[:, 0], sums[:, 1]))
        es_se, ms_se = (float(ratio_standard_error(sums[:, i], sums[:, 2])) for i in (0, 1))
    else:
        var = (model.var() - 2 * ratio * torch.cov(torch.stack([model, marginal]))[0, 1]
               + ratio ** 2 * marginal.var()) / (n * ms ** 2)
        skill_se = math.sqrt(max(float(var), 0.0))
    return {"energy_score": es, "energy_score_se": es_se, "marginal_energy_score": ms,
            "marginal_energy_score_se": ms_se, "energy_skill": 1.0 - ratio, "energy_skill_se": skill_se,
            "skill_positions": n}


@torch.no_grad()
def calm_skill(model, ae, blocks, num_samples: int = 8, num_target_samples: int = 32,
               generator: Optional[torch.Generator] = None, slice_positions: int = 4096) -> dict:
    """Energy skill of a CALM's head on held-out token blocks ([B, T] or [T] tensors, T a multiple of K),
    and the decoded-token accuracy of one head sample per position (AE argmax against the gold chunk).

    Draw order (so a seed fixes every number): per block, head samples; then, over the pooled
    positions in slices of `slice_positions`, target samples then the marginal's positions and noise."""
    device = next(model.parameters()).device
    k = model.k
    samples, mus, log_sigmas, correct, block_of, num_blocks = [], [], [], [], [], 0
    for block in blocks:
        ids = torch.as_tensor(block, device=device)
        ids = (ids[None] if ids.dim() == 1 else ids)[:, : ids.shape[-1] // k * k]
        if ids.shape[1] < 2 * k:
            continue
        mu, log_sigma = ae.encode(ids)  # [B, C, d]: chunk c's posterior
        h = model.hidden_states(ids[:, :-k])  # row c predicts chunk c + 1
        x = model.head.sample(h, num_samples, generator=generator)  # [B, C-1, N, d]
        tokens = ae.decode(x[:, :, 0]).argmax(-1)  # sample 1 decoded: [B, (C-1)·K]
        correct.append((tokens == ids[:, k:]).double().reshape(-1, k).mean(-1).cpu())  # per position
        block_of.append((num_blocks + torch.arange(x.shape[0]))[:, None].expand(-1, x.shape[1]).flatten())
        num_blocks += x.shape[0]  # every row of ids is one block: the standard errors cluster by it
        samples.append(x.flatten(0, 1).cpu())
        mus.append(mu[:, 1:].flatten(0, 1).cpu())
        log_sigmas.append(log_sigma[:, 1:].flatten(0, 1).cpu())
    if not samples:
        raise ValueError(f"no evaluation block holds at least 2 chunks of K={k} tokens")
    x, mu, log_sigma = torch.cat(samples), torch.cat(mus), torch.cat(log_sigmas)
    model_scores, marginal_scores = [], []
    for lo in range(0, x.shape[0], slice_positions):  # bounds the float64 target draws' memory
        hi = min(lo + slice_positions, x.shape[0])
        y = posterior_draws(mu[lo:hi], log_sigma[lo:hi], num_target_samples, generator)
        model_scores.append(energy_scores(x[lo:hi], y))
        marginal_scores.append(energy_scores(marginal_draws(mu, log_sigma, num_samples, generator, lo, hi), y))
    blocks_of = torch.cat(block_of)
    out = skill_summary(torch.cat(model_scores), torch.cat(marginal_scores), blocks_of)
    correct = torch.cat(correct)
    acc, acc_se = _mean_se(correct)
    if num_blocks >= 2:
        acc_se = float(ratio_standard_error(torch.zeros(num_blocks, dtype=torch.float64).index_add_(0, blocks_of, correct),
                                            torch.bincount(blocks_of, minlength=num_blocks)))
    out.update(token_accuracy=acc, token_accuracy_se=acc_se)
    return out
