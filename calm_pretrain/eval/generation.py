"""Text generation from any model that generates: the sampler its architecture's spec names
(calm_pretrain/sampling.py holds the samplers), with streaming of the first row's tokens."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from calm_pretrain.models.registry import spec_of


def generate(model, ae, prompt_ids, max_new_tokens: int, temperature: float, *, sampler: str = "batch",
             candidates: int = 200, top_p: float = 1.0, head_dtype: Optional[torch.dtype] = None,
             generator: Optional[torch.Generator] = None,
             on_tokens: Optional[Callable[[list], None]] = None) -> tuple[list, int]:
    """Prompts [T] or [B, T] (rows of one length) → (prompt + continuation ids without pads, a list per
    row for [B, T]; backbone steps taken), by the sampler of its architecture
    (its spec's `generate`: a CALM samples through its `ae`). `on_tokens(new
    ids)` streams row 0's tokens as each step chooses them (pads and anything after EOS left out)."""
    cfg = model.config
    steps, stopped = [0], [False]

    def on_chunk(chunk: torch.Tensor) -> None:
        steps[0] += 1
        if on_tokens is None or stopped[0]:
            return
        out = []
        for t in chunk[0].tolist():
            if t == cfg.pad_token_id:
                continue
            out.append(t)
            if t == cfg.eos_token_id:
                stopped[0] = True
                break
        on_tokens(out)
    spec = spec_of(cfg)
    if spec.generate is None:
        raise ValueError(f"a {spec.arch} model does not generate text")
    ids = spec.generate(model, ae, prompt_ids, max_new_tokens, temperature, sampler=sampler, candidates=candidates,
                        top_p=top_p, head_dtype=head_dtype, generator=generator, on_chunk=on_chunk)
    return (ids.tolist() if torch.is_tensor(ids) else [row.tolist() for row in ids]), steps[0]
