"""Pipeline stages of the decoder backbone that CALM and the Transformer share: the decoder layers, and
the Transformer's first and last stage. Each stage takes and returns what DeepSpeed's PipelineModule
passes between stages (a tensor, or a tuple whose first entry is the hidden state). No parallelism is
set up here: calm_pretrain/parallel/pipeline.py partitions these stages and runs them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calm_pretrain.models.backbone import RotaryEmbedding


class TokenInputStage(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed_tokens = model.transformer.embed_tokens

    def forward(self, inputs):
        ids = inputs[0] if isinstance(inputs, tuple) else inputs
        return self.embed_tokens(ids)


class BlockStage(nn.Module):
    """One decoder layer; RoPE tables are recomputed per stage (no parameters, cheap)."""

    def __init__(self, layer, cfg):
        super().__init__()
        self.layer = layer
        self.rotary = RotaryEmbedding(cfg.hidden_size // cfg.num_heads, cfg.rope_theta)

    def forward(self, inputs):
        x, rest = (inputs[0], inputs[1:]) if isinstance(inputs, tuple) else (inputs, ())
        cos, sin = self.rotary(torch.arange(x.shape[1], device=x.device), x.dtype)
        x = self.layer(x, cos, sin)
        return (x, *rest) if rest else x


class LMOutputStage(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.norm, self.lm_head = model.transformer.norm, model.lm_head

    def forward(self, x):
        return self.lm_head(self.norm(x))


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


def block_stages(model) -> list[nn.Module]:
    """The backbone's decoder layers, one stage-able module each."""
    return [BlockStage(layer, model.config) for layer in model.transformer.layers]
