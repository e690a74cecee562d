"""The discrete next-token Transformer baseline on the same backbone, trained with cross-entropy."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from calm_pretrain.models.transformer.config import TransformerConfig
from calm_pretrain.models.backbone import Backbone, KVCache
from calm_pretrain.models.layers import init_weights


@dataclass
class LMOutput:
    loss: torch.Tensor
    logits: torch.Tensor


class TransformerLM(nn.Module):
    k = 1  # one token per position

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        self.transformer = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self, param_context=None) -> None:
        """The published init; `param_context` as in `init_weights` (used by sharded builds)."""
        init_weights(self, self.config.init_std, param_context)

    def logits(self, ids: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        return self.lm_head(self.transformer(self.transformer.embed_tokens(ids), cache))

    def forward(self, ids: torch.Tensor) -> LMOutput:
        logits = self.logits(ids[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        return LMOutput(loss=loss, logits=logits)

    def new_cache(self) -> KVCache:
        return self.transformer.new_cache()
