"""CALM language model: input compression of K tokens, Llama backbone, generative head.

Position i reads the tokens of chunk i and predicts the latent of chunk i+1 (docs/method.md,
'CALM language model'). The
frozen autoencoder is not part of this module: training reads pre-encoded posteriors (mu, log_sigma)
and evaluation/generation take the autoencoder as an argument.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from calm_pretrain.models.calm.config import CALMConfig
from calm_pretrain.models.backbone import Backbone, KVCache
from calm_pretrain.models.calm.heads import build_head, head_init_std
from calm_pretrain.models.layers import init_weights


@dataclass
class CALMOutput:
    loss: torch.Tensor  # mean head loss over predicted positions
    hidden: torch.Tensor  # [B, N-1, H]: hidden states of the predicting positions


class CALM(nn.Module):
    def __init__(self, cfg: CALMConfig):
        super().__init__()
        self.config = cfg
        h = cfg.hidden_size
        self.transformer = Backbone(cfg)
        self.embed_proj = nn.Sequential(
            nn.Linear(cfg.k * h, 2 * h), nn.SiLU(), nn.Linear(2 * h, h), nn.LayerNorm(h, eps=1e-6)
        )
        self.mlp_generator = build_head(h, cfg.latent_dim, cfg.head)
        self.reset_parameters()

    def reset_parameters(self, param_context=None) -> None:
        """The published init, with the head's std scaled below the reference width (`head_init_std`);
        `param_context` as in `init_weights` (used by sharded builds)."""
        cfg = self.config
        init_weights(self, cfg.init_std, param_context)
        head_std = head_init_std(cfg.init_std, cfg.hidden_size, cfg.head.init_reference_width)
        if head_std != cfg.init_std:  # published widths (H >= 1024) keep the published draws exactly
            init_weights(self.mlp_generator, head_std, param_context)
        if hasattr(self.mlp_generator, "reset_output"):  # the head is small: gather it whole
            params = list(self.mlp_generator.parameters())
            with param_context(params) if param_context else contextlib.nullcontext():
                self.mlp_generator.reset_output()

    @property
    def k(self) -> int:
        return self.config.k

    @property
    def head(self) -> nn.Module:
        return self.mlp_generator

    def embed_chunks(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, N·K] → chunk embeddings [B, N, H] (embed, concatenate K tokens, compress)."""
        b, t = ids.shape
        if t % self.k:
            raise ValueError(f"token length {t} is not a multiple of K={self.k}")
        e = self.transformer.embed_tokens(ids).reshape(b, t // self.k, self.k * self.config.hidden_size)
        return self.embed_proj(e)

    def hidden_states(self, ids: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        """Backbone output [B, N, H] for the chunks of ids [B, N·K]; row n predicts chunk n+1."""
        return self.transformer(self.embed_chunks(ids), cache)

    def forward(self, ids: torch.Tensor, target_mu: torch.Tensor, target_log_sigma: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> CALMOutput:
        """ids [B, N·K]; target_mu/log_sigma [B, N, d]: the AE posterior of every chunk of ids."""
        h = self.hidden_states(ids[:, : -self.k])  # the last chunk predicts nothing in this sample
        loss = self.head.loss(h, target_mu[:, 1:], target_log_sigma[:, 1:], generator=generator)
        return CALMOutput(loss=loss.mean(), hidden=h)

    def new_cache(self) -> KVCache:
        return self.transformer.new_cache()
