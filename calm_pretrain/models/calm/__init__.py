"""CALM (``model.arch: calm``): input compression of K tokens, the decoder backbone and a generative
head on the latents of a frozen autoencoder. Config, module, heads, FLOPs, pipeline stages and spec.

Imports the shared model code, the autoencoder's config and FLOPs (CALM runs on top of one), the
FLOPs conventions, the evaluation scores and the schema; never the trainer, engines or workflows.
"""
from __future__ import annotations

import torch

from calm_pretrain.scores import calm_scores
from calm_pretrain.models.backbone import DecoderLayer
from calm_pretrain.models.calm.config import CALMConfig, HeadConfig
from calm_pretrain.models.calm.flops import inference_flops, training_flops
from calm_pretrain.models.calm.heads import HEADS, ResidualMLPBlock
from calm_pretrain.models.calm.model import CALM
from calm_pretrain.models.calm.pipeline_stages import pipeline_batch, pipeline_layers
from calm_pretrain.models.calm.release import RELEASE
from calm_pretrain.models.spec import ModelSpec
from calm_pretrain.sampling import generate_calm


def loss(forward, batch: dict):
    """The head's loss (energy score by default) against the next chunks' latent posteriors."""
    return forward(batch["ids"], batch["mu"], batch["log_sigma"]).loss, {}


def data(cfg: CALMConfig, seq_chunks: int) -> dict:
    """Latent shards (token ids with each chunk's posterior) of this K and latent size."""
    return {"k": cfg.k, "latent_dim": cfg.latent_dim, "sample_tokens": seq_chunks * cfg.k,
            "vocab_size": cfg.vocab_size}


def generate(model, ae, prompt_ids, max_new_tokens: int, temperature: float, *, sampler: str, candidates: int,
             top_p: float, head_dtype, generator, on_chunk):
    """Likelihood-free temperature sampling, one K-token chunk per step, decoded by the frozen `ae`
    (`top_p` unused; `head_dtype`: None or the opt-in low-precision head)."""
    if ae is None:
        raise ValueError("a CALM generates through its frozen autoencoder: none was given")
    return generate_calm(model, ae, prompt_ids, max_new_tokens, temperature, num_candidates=candidates,
                         generator=generator, sampler=sampler, on_chunk=on_chunk, head_dtype=head_dtype)


def example_batch(cfg: CALMConfig, batch_size: int, seq_chunks: int, generator) -> dict:
    """Random token ids and latent posteriors in a loader batch's shapes (benchmarks, tests)."""
    shape = (batch_size, seq_chunks, cfg.latent_dim)
    return {"ids": torch.randint(3, cfg.vocab_size, (batch_size, seq_chunks * cfg.k), generator=generator),
            "mu": torch.randn(shape, generator=generator), "log_sigma": torch.full(shape, -2.0)}


SPEC = ModelSpec(
    arch="calm", label="CALM", config=CALMConfig, model=CALM,
    components=(("transformer.embed_tokens.", "input embedding"), ("transformer.", "backbone layers"),
                ("embed_proj.", "input compression"), ("mlp_generator.", "head")),
    loss=loss, data=data, example_batch=example_batch, evaluate=calm_scores, training_flops=training_flops, inference_flops=inference_flops,
    generate=generate, published_block_tokens=8192, max_temperature=1.0,
    uses_autoencoder=True, pipeline_layers=pipeline_layers, pipeline_batch=pipeline_batch,
    checkpoint_blocks=(DecoderLayer,), zero3_leaves=(ResidualMLPBlock,), compile_blocks=(DecoderLayer, *HEADS.values()),
    release=RELEASE,
)

__all__ = ["CALMConfig", "HeadConfig", "CALM", "SPEC"]
