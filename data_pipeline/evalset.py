"""Evaluation blocks from any text source (a JSONL eval set such as WikiText-103's test documents).

Documents are tokenized, joined with EOS (the LM layout) and cut into blocks of `block_tokens`; the
tail that does not fill a block is dropped. The block size changes BrierLM (by ~30% between 2048 and
8192 tokens on the reference models), so callers record it with every score.
"""
from __future__ import annotations

from typing import Optional

import torch

from data_pipeline.sources import iter_documents, resolve_inputs
from data_pipeline.tokenize import pack_lm
from data_pipeline.tokenizers import Tokenizer


def eval_blocks(path: str, tokenizer: Tokenizer, block_tokens: int, text_field: str = "text",
                max_blocks: int = 0) -> list[torch.Tensor]:
    """[1, block_tokens] int64 blocks of the documents in `path` (all of them, or the first `max_blocks`)."""
    docs = tokenizer.encode_batch(list(iter_documents(resolve_inputs([path]), text_field=text_field)))
    blocks, _ = pack_lm(docs, block_tokens, tokenizer.eos_id)
    if max_blocks:
        blocks = blocks[:max_blocks]
    return [torch.from_numpy(b).long()[None] for b in blocks]


def brier_on_text(model, path: str, tokenizer: Tokenizer, block_tokens: int, ae=None, text_field: str = "text",
                  max_blocks: int = 0, generator: Optional[torch.Generator] = None) -> dict:
    """BrierLM of a CALM (with its autoencoder) or a Transformer on a text source; the result names the
    eval set and the block size."""
    from calm_pretrain.brier import evaluate_brier

    blocks = eval_blocks(path, tokenizer, block_tokens, text_field, max_blocks)
    with torch.no_grad():
        result = evaluate_brier(model.eval(), blocks, ae=ae, generator=generator)
    return {**result, "eval_set": str(path), "block_tokens": block_tokens}
