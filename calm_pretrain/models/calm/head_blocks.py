"""Building blocks shared by CALM's generative heads: the width-aware init, the residual MLP block
with its condition split, the output layer, the compute dtype and posterior sampling of the targets."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def head_init_std(init_std: float, width: int, reference_width: int) -> float:
    """The head's init std at backbone width `width`: init_std below `reference_width` scaled by
    sqrt(reference_width / width), else init_std (reference_width 0: never scaled).

    Why: every linear of fan-in H with N(0, s²) weights scales its input by about s·sqrt(H). The
    condition reaches the energy head's residual stream through a chain of such linears and a gated
    product, so its effect at init shrinks like a high power of s·sqrt(H): measured with s = 0.02,
    a change of the condition moves the residual stream by ~4e-6 (relative) at H = 128 against ~1e-2
    at H = 1024, and a narrow head barely learns to use its condition. Holding s·sqrt(H) at its
    published CALM-M value restores that regime at every width (tests/test_head_init.py)."""
    if reference_width and width < reference_width:
        return init_std * math.sqrt(reference_width / width)
    return init_std


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


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Losses are reduced in fp32 (fp64 stays fp64): bf16 sums of squares lose most of their digits."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def posterior_samples(mu: torch.Tensor, log_sigma: torch.Tensor, num_samples: int,
                      generator: Optional[torch.Generator] = None, dtype: Optional[torch.dtype] = None):
    """num_samples draws from N(mu, exp(log_sigma)²) per position: [..., d] → [..., N, d].

    The autoencoder is frozen, so the targets carry no gradient (docs/method.md, 'Energy score': the head must learn
    the posterior's spread, not only its mean)."""
    dtype = dtype or mu.dtype
    mu, sigma = mu.detach().to(dtype), log_sigma.detach().to(dtype).exp()
    eps = torch.randn((*mu.shape[:-1], num_samples, mu.shape[-1]), generator=generator, device=mu.device, dtype=dtype)
    return mu[..., None, :] + sigma[..., None, :] * eps
