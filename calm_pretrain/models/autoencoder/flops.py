"""The autoencoder's FLOPs (conventions in calm_pretrain/flops.py)."""
from __future__ import annotations

from calm_pretrain.flops import linear_flops
from calm_pretrain.models.autoencoder.config import AutoencoderConfig


def autoencoder_encoder_forward(ae: AutoencoderConfig) -> int:
    """Encoder, per chunk: one half of the layers per token, the other half per chunk."""
    h, i, k = ae.hidden_size, ae.intermediate_size, ae.k
    layer = 3 * linear_flops(h, i)
    half = ae.num_encoder_layers // 2
    return k * half * layer + linear_flops(k * h, h) + half * layer + linear_flops(h, 2 * ae.latent_dim)


def autoencoder_decoder_forward(ae: AutoencoderConfig) -> int:
    """Decoder, per chunk, including the tied output projection over the vocabulary for K tokens."""
    h, i, k = ae.hidden_size, ae.intermediate_size, ae.k
    layer = 3 * linear_flops(h, i)
    half = ae.num_decoder_layers // 2
    return (linear_flops(ae.latent_dim, h) + half * layer + linear_flops(h, k * h) + k * half * layer
            + k * linear_flops(h, ae.vocab_size))


def training_flops(cfg: AutoencoderConfig, context: int, ae=None) -> dict:
    """Per token: encoder and decoder, forward and backward (the context does not matter: chunks are independent)."""
    enc, dec = autoencoder_encoder_forward(cfg), autoencoder_decoder_forward(cfg)
    return {"encoder": 3 * enc / cfg.k, "decoder": 3 * dec / cfg.k}
