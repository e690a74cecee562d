"""The token-chunk autoencoder (``model.arch: autoencoder``): its config, module, FLOPs and spec.

Owns everything the rest of the project needs to know about the autoencoder; imports only the shared
model code (layers, losses), the FLOPs conventions, the evaluation scores and the config schema.
"""
from __future__ import annotations

import torch

from calm_pretrain.scores import autoencoder_scores
from calm_pretrain.models.autoencoder.config import AutoencoderConfig
from calm_pretrain.models.autoencoder.flops import training_flops
from calm_pretrain.models.autoencoder.model import AELayer, Autoencoder
from calm_pretrain.models.autoencoder.release import RELEASE
from calm_pretrain.models.spec import ModelSpec


def loss(forward, batch: dict):
    """CE·K + β·KL of a batch of token chunks; logs the cross-entropy, the KL and the token accuracy."""
    out = forward(batch["ids"])
    return out.loss, {"ce": out.ce.detach(), "kl": out.kl.detach(), "accuracy": out.accuracy.detach()}


def data(cfg: AutoencoderConfig, seq_chunks: int) -> dict:
    """Token shards cut into samples of whole chunks."""
    return {"k": cfg.k, "sample_tokens": seq_chunks * cfg.k, "vocab_size": cfg.vocab_size}


def example_batch(cfg: AutoencoderConfig, batch_size: int, seq_chunks: int, generator) -> dict:
    """Random token ids in a loader batch's shape (benchmarks, tests)."""
    return {"ids": torch.randint(3, cfg.vocab_size, (batch_size, seq_chunks * cfg.k), generator=generator)}


SPEC = ModelSpec(
    arch="autoencoder", label="AE", config=AutoencoderConfig, model=Autoencoder,
    components=(("encoder.embed_tokens.", "token embedding (tied)"), ("encoder.", "encoder"),
                ("decoder.", "decoder")),
    loss=loss, data=data, example_batch=example_batch, evaluate=autoencoder_scores, training_flops=training_flops,
    encodes_latents=True, checkpoint_blocks=(AELayer,), release=RELEASE,
)

__all__ = ["AutoencoderConfig", "Autoencoder", "SPEC"]
