"""The token-chunk variational autoencoder (docs/method.md, 'Autoencoder').

K tokens → Gaussian posterior N(mu, sigma²) of dimension d → K tokens. MLP-only layers (no
attention), the decoder's output projection tied to the encoder's token embedding. Parameter names
follow the published release layout, so export is a rename-free copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from calm_pretrain.models.autoencoder.argmax import ScreenedArgmax
from calm_pretrain.models.autoencoder.config import AutoencoderConfig
from calm_pretrain.losses import clipped_gaussian_kl
from calm_pretrain.models.layers import RMSNorm, SwiGLU, init_weights


class AELayer(nn.Module):
    """x + SwiGLU(RMSNorm(x))."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.layernorm(x))


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.k, self.hidden = cfg.k, cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.encoder_layers = nn.ModuleList(AELayer(cfg) for _ in range(cfg.num_encoder_layers))
        self.squeeze_layer = nn.Linear(cfg.k * cfg.hidden_size, cfg.hidden_size)
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.hidden_to_latent = nn.Linear(cfg.hidden_size, 2 * cfg.latent_dim)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, N·K] → (mu, log_sigma), each [B, N, d]."""
        b, t = ids.shape
        n = t // self.k
        x = self.embed_tokens(ids.reshape(b * n, self.k))  # [B·N, K, H]
        half = len(self.encoder_layers) // 2
        for layer in self.encoder_layers[:half]:  # per token
            x = layer(x)
        x = self.squeeze_layer(x.reshape(b * n, self.k * self.hidden))  # [B·N, H]
        for layer in self.encoder_layers[half:]:  # per chunk
            x = layer(x)
        stats = self.hidden_to_latent(self.norm(x)).reshape(b, n, -1)
        mu, log_sigma = stats.chunk(2, dim=-1)
        return mu, log_sigma


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig, embedding: nn.Parameter):
        super().__init__()
        self.k, self.hidden = cfg.k, cfg.hidden_size
        self.latent_to_hidden = nn.Linear(cfg.latent_dim, cfg.hidden_size)
        self.decoder_layers = nn.ModuleList(AELayer(cfg) for _ in range(cfg.num_decoder_layers))
        self.expand_layer = nn.Linear(cfg.hidden_size, cfg.k * cfg.hidden_size)
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head_weight = embedding  # tied to the encoder's token embedding (same Parameter)

    def chunk_states(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., N, d] → the per-token states [..., N, K, H] that enter the per-token layers."""
        x = self.latent_to_hidden(z)
        half = len(self.decoder_layers) // 2
        for layer in self.decoder_layers[:half]:  # per chunk
            x = layer(x)
        return self.expand_layer(x).reshape(*z.shape[:-1], self.k, self.hidden)

    def token_features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token states [..., H] → the normed features the output projection reads. Position-wise
        (MLP layers only), so any subset of a chunk's tokens can be finished on its own."""
        for layer in self.decoder_layers[len(self.decoder_layers) // 2:]:  # per token
            x = layer(x)
        return self.norm(x)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., N, d] → logits [..., N·K, V]."""
        x = self.chunk_states(z)
        x = x.reshape(*x.shape[:-3], x.shape[-3] * self.k, self.hidden)
        return F.linear(self.token_features(x), self.lm_head_weight)


@dataclass
class AEOutput:
    loss: torch.Tensor
    ce: torch.Tensor  # mean token cross-entropy
    kl: torch.Tensor  # clipped KL, summed over dims, mean over chunks
    accuracy: torch.Tensor  # token reconstruction accuracy of this batch
    logits: torch.Tensor


class Autoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg, self.encoder.embed_tokens.weight)
        self._screened = ScreenedArgmax()  # a cache (bf16 copy of the output projection), not state
        self.reset_parameters()

    def reset_parameters(self, param_context=None) -> None:
        """The published init; `param_context` as in `init_weights` (used by sharded builds)."""
        init_weights(self, self.config.init_std, param_context)

    @property
    def k(self) -> int:
        return self.config.k

    def encode(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters (mu, log_sigma) [B, N, d] of token ids [B, N·K]; deterministic."""
        if ids.shape[-1] % self.k:
            raise ValueError(f"token length {ids.shape[-1]} is not a multiple of K={self.k}")
        return self.encoder(ids)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Logits [..., N·K, V] of latents [..., N, d]."""
        return self.decoder(z)

    def token_argmax(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token decoder states [..., H] (from ``decoder.chunk_states``) → argmax token ids [...],
        the output projection screened in bf16 and verified in full precision (argmax.py)."""
        return self._screened(self.decoder.token_features(x), self.decoder.lm_head_weight)

    def decode_tokens(self, z: torch.Tensor) -> torch.Tensor:
        """Argmax token ids [..., N·K] of latents [..., N, d]: ``decode(z).argmax(-1)`` without the
        full-precision pass over the vocabulary (generation)."""
        x = self.decoder.chunk_states(z)
        return self.token_argmax(x).reshape(*z.shape[:-2], z.shape[-2] * self.k)

    def reconstruct(self, ids: torch.Tensor) -> torch.Tensor:
        """Argmax tokens decoded from the posterior mean."""
        mu, _ = self.encode(ids)
        return self.decode(mu).argmax(-1)

    def forward(self, ids: torch.Tensor) -> AEOutput:
        """Training objective: masked tokens in, sampled + dropped-out latent, CE·K + β·KL."""
        cfg = self.config
        inputs = ids
        if self.training and cfg.token_mask_prob > 0:
            mask = torch.rand(ids.shape, device=ids.device) < cfg.token_mask_prob
            inputs = ids.masked_fill(mask, cfg.mask_token_id)
        mu, log_sigma = self.encode(inputs)
        z = mu + log_sigma.exp() * torch.randn_like(mu)
        z = F.dropout(z, p=cfg.latent_dropout, training=self.training)
        logits = self.decode(z)
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids.reshape(-1))
        kl = clipped_gaussian_kl(mu, log_sigma, cfg.kl_clamp)
        loss = ce * cfg.k + cfg.kl_weight * kl
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == ids).float().mean()
        return AEOutput(loss=loss, ce=ce, kl=kl, accuracy=accuracy, logits=logits)
