"""CALM as pipeline stages. First: token embedding + input compression of each chunk; middle: the
backbone's decoder layers; last: final norm + the generative head and its loss.

CALM's targets (the latent posteriors mu, log_sigma of the next chunks) travel with the activations
from the first stage to the last: DeepSpeed sends every tensor of a stage's output tuple downstream and
expects a gradient back for every floating-point one, so the targets are packed into one int32 tensor
(a bit-exact view of the float32 values) that carries no gradient. They are d/H of the hidden state's
size (128 of 1024 floats per position at CALM-M).
"""
from __future__ import annotations

import torch
from torch import nn

from calm_pretrain.models.pipeline_stages import block_stages


def pack_targets(mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    return torch.cat([mu, log_sigma], dim=-1).float().contiguous().view(torch.int32)


def unpack_targets(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return packed.view(torch.float32).chunk(2, dim=-1)


class CALMInputStage(nn.Module):
    def __init__(self, calm):
        super().__init__()
        self.k, self.hidden = calm.k, calm.config.hidden_size
        self.embed_tokens, self.embed_proj = calm.transformer.embed_tokens, calm.embed_proj

    def forward(self, inputs):
        ids, packed = inputs
        b, t = ids.shape
        x = self.embed_tokens(ids).reshape(b, t // self.k, self.k * self.hidden)
        return self.embed_proj(x), packed


class CALMOutputStage(nn.Module):
    def __init__(self, calm):
        super().__init__()
        self.norm, self.head = calm.transformer.norm, calm.mlp_generator

    def forward(self, inputs):
        x, packed = inputs
        mu, log_sigma = unpack_targets(packed)
        return self.head.loss(self.norm(x), mu, log_sigma).mean()


def pipeline_layers(model) -> tuple[list[nn.Module], None]:
    """The stages, and no separate loss function: the last stage's output is the loss."""
    return [CALMInputStage(model), *block_stages(model), CALMOutputStage(model)], None


def pipeline_batch(config, batch: dict):
    """A loader micro-batch as (first-stage inputs, last-stage labels): the labels travel packed."""
    ids = batch["ids"]
    inputs = (ids[:, : -config.k], pack_targets(batch["mu"][:, 1:], batch["log_sigma"][:, 1:]))
    return inputs, torch.zeros(1)
