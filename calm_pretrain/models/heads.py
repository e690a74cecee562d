"""Generative heads of CALM: hidden state h → samples of the next chunk's latent.

A head is a module with two entry points:
  * ``forward(h, noise)`` / ``sample(h, num_samples)`` → samples [..., num_samples, latent_dim]
  * ``loss(h, target_mu, target_log_sigma)`` → per-position training loss [...]
and an attribute ``evals_per_sample`` (network evaluations per generated vector). New heads register
in :data:`HEADS`; ``model.head.type`` picks one.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from calm_pretrain.losses import energy_loss


class ResidualMLPBlock(nn.Module):
    """x ← x + down(silu(g) ⊙ u), [g, u] = MLP([LN(x); c]) (the reference MLPBlock)."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.linears = nn.Sequential(
            nn.Linear(2 * width, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2 * width)
        )
        self.down_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x [P, N, H] (one row per sample), cond [P, 1, H] (shared by a position's samples).

        The first linear acts on the concatenation [LN(x); cond]; its cond half is applied once
        per position rather than once per sample.
        """
        first = self.linears[0]
        pre = F.linear(self.in_ln(x), first.weight[:, : self.width]) + F.linear(
            cond, first.weight[:, self.width :], first.bias
        )
        g, u = self.linears[4](F.silu(self.linears[2](F.silu(pre)))).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(g) * u)


class FinalLayer(nn.Module):
    def __init__(self, width: int, latent_dim: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.linears = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, latent_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linears(self.in_ln(x))


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

    def forward(self, h: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """h [..., H], noise [..., N, noise_size] → samples [..., N, latent_dim] in one batched pass."""
        lead, n = h.shape[:-1], noise.shape[-2]
        cond = self.norm_hidden(self.hidden_embd(h)).reshape(-1, 1, h.shape[-1])
        x = self.norm_noise(self.noise_embd(noise.reshape(-1, n, noise.shape[-1])))
        for block in self.mlp_blocks:
            x = block(x, cond)
        return self.final_layer(x).reshape(*lead, n, self.latent_dim)

    def sample(self, h: torch.Tensor, num_samples: int = 1, generator: Optional[torch.Generator] = None):
        return self(h, self.draw_noise(h, num_samples, generator))

    def loss(self, h, target_mu, target_log_sigma, generator: Optional[torch.Generator] = None):
        samples = self.sample(h, self.cfg.num_samples, generator)
        return energy_loss(
            samples, target_mu, target_log_sigma,
            num_target_samples=self.cfg.num_target_samples, alpha=self.cfg.alpha,
            chunk_positions=self.cfg.loss_chunk_positions, generator=generator,
        )


HEADS: dict[str, type] = {"energy": EnergyHead}


def build_head(hidden_size: int, latent_dim: int, head_cfg) -> nn.Module:
    if head_cfg.type not in HEADS:
        raise ValueError(f"model.head.type: unknown head {head_cfg.type!r}; known: {sorted(HEADS)}")
    return HEADS[head_cfg.type](hidden_size, latent_dim, head_cfg)
