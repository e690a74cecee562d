"""Decoding a generation step's latents into token chunks (calm_pretrain/sampling.py uses it).

* :func:`decode_chunks` — one chunk per latent (T = 1): the AE's argmax decoding, batched over rows.
* :func:`candidate_keys` — the keys the batch temperature sampler counts for N candidates per row,
  decoding only what the count can depend on (below).

The batch sampler at 1/T = n ≥ 2 (``batch_temperature_choice``) gives weight C(count, m) to outcomes
seen at least m times, for the largest m ≤ n with any; a chunk seen once gets weight 0 unless every
chunk of the row is seen once (m = 1), and then the choice is uniform over the candidates. So a
candidate only matters through its full K tokens when another candidate shares them. The AE
decoder's per-token layers act on each position alone, so the tokens are decoded position by
position, and a candidate whose prefix no other candidate of its row shares is dropped: its chunk
is unique, and it enters the count as a placeholder key of its own (count 1, its first-seen place
kept). Only a chosen placeholder is decoded to the end (:func:`complete`). The choice is the one the
full decoding would make with the same uniform draw.

An AE without ``decoder.chunk_states`` / ``token_argmax`` (any object with ``decode``) is decoded
in full.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.profiler import record_function


def decode_chunks(ae, z: torch.Tensor) -> torch.Tensor:
    """Latents [..., d] → argmax token ids [..., K], one chunk per latent."""
    with record_function("generate.decode"):
        if hasattr(ae, "decode_tokens"):
            return ae.decode_tokens(z.unsqueeze(-2))
        return ae.decode(z.unsqueeze(-2)).argmax(-1)


class Unique:
    """The key of a candidate whose chunk no other candidate of its row has (not decoded to the end)."""

    __slots__ = ("index", "prefix")

    def __init__(self, index: int, prefix: tuple):
        self.index, self.prefix = index, prefix

    def __repr__(self) -> str:
        return f"Unique({self.index}, {self.prefix})"


def _prunable(ae) -> bool:
    return hasattr(ae, "token_argmax") and hasattr(getattr(ae, "decoder", None), "chunk_states")


def candidate_keys(ae, z: torch.Tensor) -> tuple[list[list], object]:
    """z [R, N, d] (N candidate latents for each of R rows) → (keys: per row N entries, a K-token
    tuple or a :class:`Unique`; the state :func:`complete` needs)."""
    r, n = z.shape[:2]
    if not _prunable(ae):
        with record_function("generate.decode"):
            tokens = ae.decode(z.unsqueeze(-2)).argmax(-1).tolist()  # [R, N, K]
        return [[tuple(c) for c in row] for row in tokens], None
    with record_function("generate.decode"):
        x = ae.decoder.chunk_states(z)  # [R, N, K, H]
    k = x.shape[2]
    prefixes = [[()] * n for _ in range(r)]
    alive = [(i, c) for i in range(r) for c in range(n)]
    for j in range(k):
        if not alive:
            break
        with record_function("generate.decode"):
            idx = torch.tensor(alive, device=x.device)
            tok = ae.token_argmax(x[idx[:, 0], idx[:, 1], j]).tolist()
        with record_function("generate.choose"):
            for (i, c), t in zip(alive, tok):
                prefixes[i][c] = prefixes[i][c] + (t,)
            counts = Counter((i, prefixes[i][c]) for i, c in alive)
            alive = [(i, c) for i, c in alive if counts[(i, prefixes[i][c])] >= 2]
    shared = set(alive)  # decoded to the end and shared with another candidate of the row
    keys = [[p if (i, c) in shared else Unique(c, p) for c, p in enumerate(row)] for i, row in enumerate(prefixes)]
    return keys, x


def complete(ae, state, picks: list[tuple[int, object]]) -> list[tuple]:
    """The K tokens of each chosen key: picks [(row, key)] → tuples (every Unique's missing positions
    decoded together, in one pass over the output projection)."""
    out = [key.prefix if isinstance(key, Unique) else key for _, key in picks]
    todo = [(slot, row, key.index, j) for slot, (row, key) in enumerate(picks) if isinstance(key, Unique)
            for j in range(len(key.prefix), state.shape[2])]
    if todo:
        with record_function("generate.decode"):
            rows, cands, pos = (torch.tensor(col, device=state.device) for col in list(zip(*todo))[1:])
            tokens = ae.token_argmax(state[rows, cands, pos]).tolist()
        for (slot, *_), tok in zip(todo, tokens):  # in position order within each slot
            out[slot] = out[slot] + (tok,)
    return out
