"""FLOPs model of every architecture: the numbers behind MFU, sweeps and the paper's FLOPs table.

Conventions (Kaplan et al. 2020, as the published CALM table uses them):
  * a matmul of m×k by k×n costs 2·m·k·n FLOPs; embedding look-ups, norms and activations are free;
  * causal attention costs 2·layers·context·H per position in the forward pass (QKᵀ and AV over
    half the context on average);
  * training = 3 × forward (backward is twice the forward);
  * CALM counts every head pass (N samples per position in training, one per generated vector at
    T = 1), the energy loss's distance matmuls, and the autoencoder: its encoder producing the
    training targets, its decoder turning each generated vector into K tokens at inference.
"""
from __future__ import annotations

from dataclasses import dataclass

from calm_pretrain.config import AutoencoderConfig, BackboneConfig, CALMConfig, TransformerConfig


def _linear(m_in: int, n_out: int) -> int:
    """Forward FLOPs of one row through a Linear(m_in → n_out)."""
    return 2 * m_in * n_out


def backbone_layers_forward(cfg: BackboneConfig, context: int) -> int:
    """Decoder layers, per position: projections + SwiGLU + causal attention over `context`."""
    h, hd = cfg.hidden_size, cfg.hidden_size // cfg.num_heads
    kv = cfg.num_kv_heads * hd
    proj = _linear(h, h) + 2 * _linear(h, kv) + _linear(h, h)
    mlp = 3 * _linear(h, cfg.intermediate_size)
    attention = 2 * context * h
    return cfg.num_layers * (proj + mlp + attention)


def energy_head_forward(cfg: CALMConfig, num_samples: int) -> int:
    """The energy head, per position, for `num_samples` samples (condition terms once per position)."""
    h, blocks = cfg.hidden_size, cfg.head.num_blocks
    per_position = _linear(h, h) + blocks * _linear(h, h)  # hidden_embd + cond half of each first linear
    per_sample = (_linear(cfg.head.noise_size, h)
                  + blocks * (_linear(h, h) + _linear(h, h) + _linear(h, 2 * h) + _linear(h, h))
                  + _linear(h, h) + _linear(h, cfg.latent_dim))
    return per_position + num_samples * per_sample


def energy_loss_forward(cfg: CALMConfig) -> int:
    """Distance matmuls of the energy score per position: N·M model–target and N² model–model."""
    n, m, d = cfg.head.num_samples, cfg.head.num_target_samples, cfg.latent_dim
    return 2 * n * m * d + 2 * n * n * d


def autoencoder_encoder_forward(ae: AutoencoderConfig) -> int:
    """Encoder, per chunk: one half of the layers per token, the other half per chunk."""
    h, i, k = ae.hidden_size, ae.intermediate_size, ae.k
    layer = 3 * _linear(h, i)
    half = ae.num_encoder_layers // 2
    return k * half * layer + _linear(k * h, h) + half * layer + _linear(h, 2 * ae.latent_dim)


def autoencoder_decoder_forward(ae: AutoencoderConfig) -> int:
    """Decoder, per chunk, including the tied output projection over the vocabulary for K tokens."""
    h, i, k = ae.hidden_size, ae.intermediate_size, ae.k
    layer = 3 * _linear(h, i)
    half = ae.num_decoder_layers // 2
    return (_linear(ae.latent_dim, h) + half * layer + _linear(h, k * h) + k * half * layer
            + k * _linear(h, ae.vocab_size))


@dataclass
class FlopsBreakdown:
    """FLOPs per *token* by component; `total` is their sum."""

    parts: dict

    @property
    def total(self) -> float:
        return float(sum(self.parts.values()))


def training_flops_per_token(cfg, context: int, ae: AutoencoderConfig | None = None) -> FlopsBreakdown:
    """Training FLOPs per token (forward + backward) of a model config at a given context (positions)."""
    if isinstance(cfg, CALMConfig):
        h, k = cfg.hidden_size, cfg.k
        parts = {
            "input compression": 3 * (_linear(k * h, 2 * h) + _linear(2 * h, h)),
            "backbone": 3 * backbone_layers_forward(cfg, context),
            "head": 3 * energy_head_forward(cfg, cfg.head.num_samples),
            "energy loss": 3 * energy_loss_forward(cfg),
        }
        if ae is not None:  # frozen: forward only, to produce the targets
            parts["autoencoder"] = autoencoder_encoder_forward(ae)
        return FlopsBreakdown({name: v / k for name, v in parts.items()})
    if isinstance(cfg, TransformerConfig):
        return FlopsBreakdown({
            "backbone": 3 * backbone_layers_forward(cfg, context),
            "output embedding": 3 * _linear(cfg.hidden_size, cfg.vocab_size),
        })
    if isinstance(cfg, AutoencoderConfig):
        enc, dec = autoencoder_encoder_forward(cfg), autoencoder_decoder_forward(cfg)
        return FlopsBreakdown({"encoder": 3 * enc / cfg.k, "decoder": 3 * dec / cfg.k})
    raise TypeError(f"no FLOPs model for {type(cfg).__name__}")


def inference_flops_per_token(cfg, context: int, ae: AutoencoderConfig | None = None) -> FlopsBreakdown:
    """Generation FLOPs per token at a given context: one head sample per vector (T = 1) for CALM."""
    if isinstance(cfg, CALMConfig):
        h, k = cfg.hidden_size, cfg.k
        parts = {
            "input compression": _linear(k * h, 2 * h) + _linear(2 * h, h),
            "backbone": backbone_layers_forward(cfg, context),
            "head": energy_head_forward(cfg, 1),
        }
        if ae is not None:
            parts["autoencoder"] = autoencoder_decoder_forward(ae)
        return FlopsBreakdown({name: v / k for name, v in parts.items()})
    if isinstance(cfg, TransformerConfig):
        return FlopsBreakdown({
            "backbone": backbone_layers_forward(cfg, context),
            "output embedding": _linear(cfg.hidden_size, cfg.vocab_size),
        })
    raise TypeError(f"no inference FLOPs model for {type(cfg).__name__}")
