"""Evaluation blocks from any text source (a JSONL eval set such as WikiText-103's test documents).

Documents are tokenized, joined with EOS (the LM layout) and cut into blocks of `block_tokens`; the
tail that does not fill a block is dropped. The block size changes BrierLM (by ~30% between 2048 and
8192 tokens on the reference models), so callers record it with every score. Scoring the blocks is
the evaluation package's job (calm_pretrain/eval), not the data pipeline's.
"""
from __future__ import annotations

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
