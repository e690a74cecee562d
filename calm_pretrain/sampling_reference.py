"""The straightforward CALM generation loop, as it was before the per-step work was batched (issue 18):
one row at a time, every candidate decoded in full, the choice made by
:func:`~calm_pretrain.sampling.batch_temperature_sample` on the row's K-token tuples.

Kept as the reference that tests/test_generation_fast.py compares :func:`~calm_pretrain.sampling.generate_calm`
with (same generator seed → same tokens), and that ``tools/bench_generate.py`` times for the "before"
numbers (with the same ``record_function`` labels, for the per-step breakdown). Not used for generation.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.profiler import record_function

from calm_pretrain.sampling import (batch_temperature_sample, calm_chunk_loop, calm_generation_setup,
                                    exact_temperature_sample)


@torch.no_grad()
def reference_generate_calm(calm, ae, prompt_ids, max_new_tokens: int, temperature: float = 0.5,
                            num_candidates: int = 200, eos_id: Optional[int] = None, pad_id: Optional[int] = None,
                            use_cache: bool = True, generator: Optional[torch.Generator] = None,
                            sampler: str = "batch", on_chunk: Optional[Callable[[torch.Tensor], None]] = None):
    """:func:`calm_pretrain.sampling.generate_calm` as it was (same arguments, same result for a seed)."""
    k, eos_id, pad_id, n, num_draws, device, ids, single = calm_generation_setup(
        calm, prompt_ids, temperature, num_candidates, eos_id, pad_id, sampler)

    def step(h: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        b = h.shape[0]
        chunk = ids.new_full((b, k), pad_id)
        if sampler == "exact":
            for row in range(b):
                if not done[row]:
                    chunk[row] = torch.tensor(_exact_chunk(calm, ae, h[row], temperature, generator), device=device)
            return chunk
        with record_function("generate.head"):
            z = calm.head.sample(h, num_draws, generator=generator)  # [B, N, d]
        with record_function("generate.decode"):
            tokens = ae.decode(z.unsqueeze(-2)).argmax(-1)  # [B, N, K]
        with record_function("generate.choose"):
            for row in range(b):
                if done[row]:
                    continue  # finished rows are padded, and stripped at the end
                cands = [tuple(c) for c in tokens[row].tolist()]
                chunk[row] = torch.tensor(batch_temperature_sample(cands, n, generator), device=device)
        return chunk

    return calm_chunk_loop(calm, ids, max_new_tokens, use_cache, step, eos_id, pad_id, single, on_chunk)


def _exact_chunk(calm, ae, h: torch.Tensor, temperature: float, generator) -> tuple:
    """One chunk from the exact sampler: each draw is one head sample of hidden state h [H], decoded."""
    def draw() -> tuple:
        z = calm.head.sample(h[None], 1, generator=generator)  # [1, 1, d]
        return tuple(ae.decode(z.unsqueeze(-2)).argmax(-1)[0, 0].tolist())
    return exact_temperature_sample(draw, temperature, generator)
