"""FLOPs counting: the conventions, the shared parts (linears, the decoder backbone) and the
breakdown type. Each architecture composes its own count in its package (``models/<arch>/flops.py``,
reached through the registry): the numbers behind MFU, sweeps and the paper's FLOPs table.

Conventions (Kaplan et al. 2020, as the published CALM table uses them):
  * a matmul of m×k by k×n costs 2·m·k·n FLOPs; embedding look-ups, norms and activations are free;
  * causal attention costs 2·layers·context·H per position in the forward pass (QKᵀ and AV over
    half the context on average);
  * training = 3 × forward (backward is twice the forward);
  * CALM counts every head pass, the loss's own matmuls, and the autoencoder: its encoder producing
    the training targets, its decoder turning each generated vector into K tokens at inference;
  * heads (``model.head.type``, one function each, :data:`HEAD_FLOPS`): training counts the network
    on all its training rows per position (energy: N samples; flow, diffusion: N posterior samples,
    each at its own time; gmm, mse: one pass); generation of one vector counts
    ``evals_per_sample`` network evaluations (energy: 1 sample at T = 1; flow: steps × 1 (Euler)
    or 2 (midpoint); diffusion: DDIM steps; gmm, mse: 1) plus what is computed once per position.
"""
from __future__ import annotations

from dataclasses import dataclass


def linear_flops(m_in: int, n_out: int) -> int:
    """Forward FLOPs of one row through a Linear(m_in → n_out)."""
    return 2 * m_in * n_out


def backbone_layers_forward(cfg, context: int) -> int:
    """Decoder layers (a BackboneConfig), per position: projections + SwiGLU + causal attention over `context`."""
    h, hd = cfg.hidden_size, cfg.hidden_size // cfg.num_heads
    kv = cfg.num_kv_heads * hd
    proj = linear_flops(h, h) + 2 * linear_flops(h, kv) + linear_flops(h, h)
    mlp = 3 * linear_flops(h, cfg.intermediate_size)
    attention = 2 * context * h
    return cfg.num_layers * (proj + mlp + attention)


@dataclass
class FlopsBreakdown:
    """FLOPs per *token* by component; `total` is their sum."""

    parts: dict

    @property
    def total(self) -> float:
        return float(sum(self.parts.values()))
