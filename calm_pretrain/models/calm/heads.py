"""Generative heads of CALM: hidden state h → samples of the next chunk's latent.

A head is a module with two entry points:
  * ``sample(h, num_samples, generator=None)`` → samples [..., num_samples, latent_dim]
  * ``loss(h, target_mu, target_log_sigma, generator=None)`` → per-position training loss [...]
    (targets: the frozen AE posterior N(mu, exp(log_sigma)²) of the next chunk, [..., latent_dim])
and an attribute ``evals_per_sample`` (network evaluations per generated vector). BrierLM and
temperature sampling only call ``sample``, so any head works with them. An optional
``reset_output()`` is called by CALM after the generic weight init. New heads register in
:data:`HEADS`; ``model.head.type`` picks one:
  * energy    — one-step noise → latent generator trained by the energy score (the published head)
  * flow      — flow matching, Euler/midpoint ODE sampler (``flow_steps``, ``flow_solver``)
  * diffusion — cosine-schedule ε-prediction diffusion, DDIM sampler (``diffusion_steps``)
  * gmm       — diagonal Gaussian mixture (``num_components``) trained by likelihood
  * mse       — regression onto the posterior mean; deterministic samples
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from calm_pretrain.losses import energy_loss
from calm_pretrain.models.calm.head_blocks import (FinalLayer, ResidualMLPBlock, compute_dtype, head_init_std,
                                                   posterior_samples)
from calm_pretrain.models.calm.iterative_heads import DiffusionHead, FlowHead

__all__ = ["HEADS", "EnergyHead", "FlowHead", "DiffusionHead", "GMMHead", "MSEHead", "ResidualMLPBlock",
           "build_head", "evals_per_sample", "head_init_std"]


class EnergyHead(nn.Module):
    """One-step energy-based head ("MLPGenerator"): uniform noise + condition → latent sample."""

    evals_per_sample = 1

    def __init__(self, hidden_size: int, latent_dim: int, head_cfg):
        super().__init__()
        self.cfg = head_cfg
        self.latent_dim = latent_dim
        self.noise_embd = nn.Linear(head_cfg.noise_size, hidden_size)
        self.hidden_embd = nn.Linear(hidden_size, hidden_size)
        self.norm_hidden = nn.LayerNorm(hidden_size, eps=1e-6)
        self.norm_noise = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp_blocks = nn.ModuleList(ResidualMLPBlock(hidden_size) for _ in range(head_cfg.num_blocks))
        self.final_layer = FinalLayer(hidden_size, latent_dim)

    def reset_output(self) -> None:
        """Zero-initialise the output projection, as published (called after the generic init)."""
        nn.init.zeros_(self.final_layer.linears[2].weight)
        nn.init.zeros_(self.final_layer.linears[2].bias)

    def draw_noise(self, h: torch.Tensor, num_samples: int, generator: Optional[torch.Generator] = None):
        """U[-0.5, 0.5]^noise_size for every (position, sample), in one call."""
        shape = (*h.shape[:-1], num_samples, self.cfg.noise_size)
        return torch.rand(shape, device=h.device, dtype=h.dtype, generator=generator) - 0.5

    def residual_stream(self, h: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """h [..., H], noise [..., N, noise_size] → the residual stream after the last block [P, N, H]."""
        n = noise.shape[-2]
        cond = self.norm_hidden(self.hidden_embd(h)).reshape(-1, 1, h.shape[-1])
        x = self.norm_noise(self.noise_embd(noise.reshape(-1, n, noise.shape[-1])))
        for block in self.mlp_blocks:
            x = block(x, cond)
        return x

    def forward(self, h: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """h [..., H], noise [..., N, noise_size] → samples [..., N, latent_dim] in one batched pass."""
        lead, n = h.shape[:-1], noise.shape[-2]
        return self.final_layer(self.residual_stream(h, noise)).reshape(*lead, n, self.latent_dim)

    def sample(self, h: torch.Tensor, num_samples: int = 1, generator: Optional[torch.Generator] = None):
        return self(h, self.draw_noise(h, num_samples, generator))

    def loss(self, h, target_mu, target_log_sigma, generator: Optional[torch.Generator] = None):
        samples = self.sample(h, self.cfg.num_samples, generator)
        return energy_loss(
            samples, target_mu, target_log_sigma,
            num_target_samples=self.cfg.num_target_samples, alpha=self.cfg.alpha,
            chunk_positions=self.cfg.loss_chunk_positions, generator=generator,
        )


# --------------------------------------------------------------------------------------------
# Alternative heads (docs/method.md, 'Alternative generative heads'). They share two pieces:
# posterior samples as training targets, and — for the iterative heads — an AdaLN-conditioned MLP.
# --------------------------------------------------------------------------------------------
class ConditionMLP(nn.Module):
    """h → features [..., H] for the one-shot heads: Linear + LN (as the energy head embeds h), then
    ``num_blocks`` pre-LN residual MLP blocks x ← x + W₂·SiLU(W₁·LN(x)), then the energy head's
    final-layer shape (LN, Linear, SiLU, Linear) onto the output size."""

    def __init__(self, hidden_size: int, out_dim: int, num_blocks: int):
        super().__init__()
        self.hidden_embd = nn.Linear(hidden_size, hidden_size)
        self.norm_hidden = nn.LayerNorm(hidden_size, eps=1e-6)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden_size, eps=1e-6), nn.Linear(hidden_size, hidden_size), nn.SiLU(),
                          nn.Linear(hidden_size, hidden_size))
            for _ in range(num_blocks)
        )
        self.final_layer = FinalLayer(hidden_size, out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm_hidden(self.hidden_embd(h))
        for block in self.blocks:
            x = x + block(x)
        return self.final_layer(x)


class GMMHead(nn.Module):
    """A mixture of C = ``num_components`` diagonal Gaussians per position, read off h in one pass:
    mixing logits [..., C], means [..., C, d], log standard deviations [..., C, d].

    Trained by the negative log-likelihood (nats per latent vector) of ``num_samples`` posterior
    samples per position, averaged over the samples. Sampling: a component by Gumbel-max on the
    logits, then mean + σ·ε. One network evaluation per position, whatever the number of samples.
    """

    evals_per_sample = 1
    # σ ∈ [e⁻⁷, e⁵]: the posterior's σ ≈ 0.3 sits far inside; the floor keeps a component that
    # collapses onto one sample from driving the likelihood to infinity
    LOG_SIGMA_MIN, LOG_SIGMA_MAX = -7.0, 5.0

    def __init__(self, hidden_size: int, latent_dim: int, head_cfg):
        super().__init__()
        self.cfg = head_cfg
        self.latent_dim = latent_dim
        self.num_components = head_cfg.num_components
        self.net = ConditionMLP(hidden_size, self.num_components * (2 * latent_dim + 1), head_cfg.num_blocks)

    def mixture(self, h: torch.Tensor):
        """h [..., H] → (logits [..., C], means [..., C, d], log_sigma [..., C, d])."""
        c, d = self.num_components, self.latent_dim
        out = self.net(h)
        logits = out[..., :c]
        params = out[..., c:].reshape(*h.shape[:-1], c, 2, d)
        log_sigma = params[..., 1, :].clamp(self.LOG_SIGMA_MIN, self.LOG_SIGMA_MAX)
        return logits, params[..., 0, :], log_sigma

    def nll(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """−log p(y | h) for y [..., N, d] → [..., N].

        Σ_d (y − m)²/σ² is expanded into matmuls (Σ y²/σ² − 2 Σ y·m/σ² + Σ m²/σ²) so that nothing of
        size N·C·d is materialised; the samples and the means are first shifted by the samples' mean
        (the likelihood is translation invariant) so that the expansion cancels no large terms.
        """
        logits, means, log_sigma = self.mixture(h)
        dt = compute_dtype(means)
        logits, means, log_sigma, y = logits.to(dt), means.to(dt), log_sigma.to(dt), y.to(dt)
        center = y.detach().mean(-2, keepdim=True)  # [..., 1, d]
        yc, mc = y - center, means - center
        inv_var = torch.exp(-2 * log_sigma)  # [..., C, d]
        quad = (yc.square() @ inv_var.transpose(-1, -2)  # [..., N, C]
                - 2 * yc @ (mc * inv_var).transpose(-1, -2)
                + (mc.square() * inv_var).sum(-1)[..., None, :]).clamp_min(0.0)
        log_norm = -log_sigma.sum(-1) - 0.5 * self.latent_dim * math.log(2 * math.pi)  # [..., C]
        log_comp = F.log_softmax(logits, -1)[..., None, :] + log_norm[..., None, :] - 0.5 * quad
        return -torch.logsumexp(log_comp, dim=-1)

    def loss(self, h, target_mu, target_log_sigma, generator: Optional[torch.Generator] = None):
        y = posterior_samples(target_mu, target_log_sigma, self.cfg.num_samples, generator, dtype=h.dtype)
        return self.nll(h, y).mean(-1)

    def sample(self, h: torch.Tensor, num_samples: int = 1, generator: Optional[torch.Generator] = None):
        logits, means, log_sigma = self.mixture(h)
        u = torch.rand((*logits.shape[:-1], num_samples, self.num_components), generator=generator,
                       device=h.device, dtype=torch.float32)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))  # Gumbel-max: argmax ~ softmax(logits)
        comp = (logits.float()[..., None, :] + gumbel).argmax(-1)  # [..., N]
        idx = comp[..., None].expand(*comp.shape, self.latent_dim)
        m, s = means.gather(-2, idx), log_sigma.gather(-2, idx).exp()
        eps = torch.randn(m.shape, generator=generator, device=h.device, dtype=m.dtype)
        return m + s * eps


class MSEHead(nn.Module):
    """Plain regression: predict the posterior mean, loss = mean over d of (pred − μ)². The optimum is
    E[z | h], so sample() is deterministic (every "sample" is that prediction): the baseline that
    shows what a head loses by not modelling the distribution."""

    evals_per_sample = 1

    def __init__(self, hidden_size: int, latent_dim: int, head_cfg):
        super().__init__()
        self.cfg = head_cfg
        self.latent_dim = latent_dim
        self.net = ConditionMLP(hidden_size, latent_dim, head_cfg.num_blocks)

    def loss(self, h, target_mu, target_log_sigma, generator: Optional[torch.Generator] = None):
        # Regressing on μ rather than on posterior samples has the same minimiser and less variance.
        pred = self.net(h)
        dt = compute_dtype(pred)
        return (pred.to(dt) - target_mu.detach().to(dt)).square().mean(-1)

    def sample(self, h: torch.Tensor, num_samples: int = 1, generator: Optional[torch.Generator] = None):
        pred = self.net(h)
        return pred[..., None, :].expand(*pred.shape[:-1], num_samples, self.latent_dim).contiguous()


HEADS: dict[str, type] = {
    "energy": EnergyHead,
    "flow": FlowHead,
    "diffusion": DiffusionHead,
    "gmm": GMMHead,
    "mse": MSEHead,
}


def evals_per_sample(head_cfg) -> int:
    """Network evaluations per generated vector of the head a config describes, without building it:
    the head class's ``evals_for(head_cfg)`` where the count depends on the config, else its constant
    ``evals_per_sample`` (the number an instance reports)."""
    cls = HEADS[head_cfg.type]
    return cls.evals_for(head_cfg) if hasattr(cls, "evals_for") else cls.evals_per_sample


def build_head(hidden_size: int, latent_dim: int, head_cfg) -> nn.Module:
    if head_cfg.type not in HEADS:
        raise ValueError(f"model.head.type: unknown head {head_cfg.type!r}; known: {sorted(HEADS)}")
    return HEADS[head_cfg.type](hidden_size, latent_dim, head_cfg)
