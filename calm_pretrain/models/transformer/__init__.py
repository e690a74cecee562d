"""The discrete next-token Transformer baseline (``model.arch: transformer``): config, module, spec.

Imports only the shared backbone code, the FLOPs conventions, the evaluation scores and the schema.
"""
from __future__ import annotations

import torch

from calm_pretrain.scores import lm_scores
from calm_pretrain.flops import backbone_layers_forward, linear_flops
from calm_pretrain.models.backbone import DecoderLayer
from calm_pretrain.models.pipeline_stages import LMOutputStage, TokenInputStage, block_stages, lm_loss
from calm_pretrain.models.spec import ModelSpec
from calm_pretrain.models.transformer.config import TransformerConfig
from calm_pretrain.models.transformer.model import TransformerLM
from calm_pretrain.models.transformer.release import RELEASE
from calm_pretrain.sampling import generate_transformer


def loss(forward, batch: dict):
    """Next-token cross-entropy."""
    return forward(batch["ids"]).loss, {}


def data(cfg: TransformerConfig, seq_chunks: int) -> dict:
    """Token shards of `seq_chunks` tokens per sample."""
    return {"sample_tokens": seq_chunks, "vocab_size": cfg.vocab_size}


def training_flops(cfg: TransformerConfig, context: int, ae=None) -> dict:
    return {"backbone": 3 * backbone_layers_forward(cfg, context),
            "output embedding": 3 * linear_flops(cfg.hidden_size, cfg.vocab_size)}


def inference_flops(cfg: TransformerConfig, context: int, ae=None) -> dict:
    return {"backbone": backbone_layers_forward(cfg, context),
            "output embedding": linear_flops(cfg.hidden_size, cfg.vocab_size)}


def pipeline_layers(model):
    """Token embedding | decoder layers | norm + LM head, with the cross-entropy as DeepSpeed's loss_fn."""
    return [TokenInputStage(model), *block_stages(model), LMOutputStage(model)], lm_loss


def pipeline_batch(config: TransformerConfig, batch: dict):
    ids = batch["ids"]
    return (ids[:, :-1],), ids[:, 1:]


def generate(model, ae, prompt_ids, max_new_tokens: int, temperature: float, *, sampler: str, candidates: int,
             top_p: float, head_dtype, generator, on_chunk):
    """Softmax temperature (and nucleus) sampling, one token per step (`ae`, `sampler`, `candidates`,
    `head_dtype` unused)."""
    return generate_transformer(model, prompt_ids, max_new_tokens, temperature, generator=generator, top_p=top_p,
                                on_chunk=on_chunk)


def example_batch(cfg: TransformerConfig, batch_size: int, seq_chunks: int, generator) -> dict:
    """Random token ids in a loader batch's shape (benchmarks, tests)."""
    return {"ids": torch.randint(3, cfg.vocab_size, (batch_size, seq_chunks), generator=generator)}


SPEC = ModelSpec(
    arch="transformer", label="Transformer", config=TransformerConfig, model=TransformerLM,
    components=(("transformer.embed_tokens.", "input embedding"), ("transformer.", "backbone layers"),
                ("lm_head.", "output embedding")),
    loss=loss, data=data, example_batch=example_batch, evaluate=lm_scores, training_flops=training_flops, inference_flops=inference_flops,
    generate=generate, pipeline_layers=pipeline_layers, pipeline_batch=pipeline_batch, checkpoint_blocks=(DecoderLayer,),
    release=RELEASE,
)

__all__ = ["TransformerConfig", "TransformerLM", "SPEC"]
