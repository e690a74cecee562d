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

from calm_pretrain.sampling import (as_batch, batch_temperature_sample, exact_temperature_sample,
                                    finish_generation, inverse_temperature, split_inverse_temperature,
                                    truncate_after_eos)


@torch.no_grad()
def reference_generate_calm(calm, ae, prompt_ids, max_new_tokens: int, temperature: float = 0.5,
                            num_candidates: int = 200, eos_id: Optional[int] = None, pad_id: Optional[int] = None,
                            use_cache: bool = True, generator: Optional[torch.Generator] = None,
                            sampler: str = "batch", on_chunk: Optional[Callable[[torch.Tensor], None]] = None):
    """:func:`calm_pretrain.sampling.generate_calm` as it was (same arguments, same result for a seed)."""
    k = calm.k
    cfg = calm.config
    eos_id = cfg.eos_token_id if eos_id is None else eos_id
    pad_id = cfg.pad_token_id if pad_id is None else pad_id
    if sampler not in ("batch", "exact"):
        raise ValueError(f"sampler must be 'batch' or 'exact', got {sampler!r}")
    n = inverse_temperature(temperature) if sampler == "batch" else split_inverse_temperature(temperature)[0]
    num_draws = 1 if n == 1 or sampler == "exact" else num_candidates
    device = next(calm.parameters()).device

    ids, single = as_batch(prompt_ids)
    ids = ids.to(device)
    b = ids.shape[0]
    if ids.shape[1] == 0:
        raise ValueError("an empty prompt has no chunk to condition on")
    pad_len = -ids.shape[1] % k
    ids = torch.cat([ids, ids.new_full((b, pad_len), pad_id)], 1)

    cache = calm.new_cache() if use_cache else None
    new_chunks: list[torch.Tensor] = []
    done = torch.zeros(b, dtype=torch.bool, device=device)
    feed = ids  # what the cached path still has to read
    for _ in range(-(-max_new_tokens // k)):
        if use_cache:
            with record_function("generate.backbone"):  # embedding included
                h = calm.hidden_states(feed, cache)[:, -1]
        else:
            with record_function("generate.backbone"):
                h = calm.hidden_states(torch.cat([ids, *new_chunks], 1))[:, -1]
        chunk = ids.new_full((b, k), pad_id)
        if sampler == "exact":
            for row in range(b):
                if not done[row]:
                    chunk[row] = torch.tensor(_exact_chunk(calm, ae, h[row], temperature, generator), device=device)
        else:
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
        new_chunks.append(chunk)
        if on_chunk is not None:
            on_chunk(chunk)
        feed = chunk
        done |= (chunk == eos_id).any(-1)
        if done.all():
            break

    new = torch.cat(new_chunks, 1)[:, :max_new_tokens] if new_chunks else ids[:, :0]
    out = torch.cat([ids, truncate_after_eos(new, eos_id, pad_id)], 1)
    return finish_generation(out, pad_id, single)


def _exact_chunk(calm, ae, h: torch.Tensor, temperature: float, generator) -> tuple:
    """One chunk from the exact sampler: each draw is one head sample of hidden state h [H], decoded."""
    def draw() -> tuple:
        z = calm.head.sample(h[None], 1, generator=generator)  # [1, 1, d]
        return tuple(ae.decode(z.unsqueeze(-2)).argmax(-1)[0, 0].tolist())
    return exact_temperature_sample(draw, temperature, generator)
