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
kept). Identical latents (a deterministic head's samples) are decoded once and counted as many times
as they occur. Only a chosen placeholder is decoded to the end (:func:`complete`), and the one the
uniform picks if every chunk is unique is decoded to the end in the first pass already (``ahead``).
Once the candidates still alive after a position are few (at most ``FEW_ROWS`` rows for all of
their remaining positions), their remaining positions are decoded together: a pass over the output
projection for a few rows only reads it, so it costs about what one position costs.
The choice is the one the full decoding would make with the same uniform draw.

An AE without ``decoder.chunk_states`` / ``token_argmax`` (any object with ``decode``) is decoded
in full.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

import torch
from torch.profiler import record_function


def decode_chunks(ae, z: torch.Tensor) -> torch.Tensor:
    """Latents [..., d] → argmax token ids [..., K], one chunk per latent."""
    with record_function("generate.decode"):
        if hasattr(ae, "decode_tokens"):
            return ae.decode_tokens(z.unsqueeze(-2))
        return ae.decode(z.unsqueeze(-2)).argmax(-1)


class Unique:
    """The key of a candidate whose chunk no other candidate of its row has (not decoded to the end):
    candidate ``index`` of its row, the distinct latent ``latent`` it is, its tokens decoded so far."""

    __slots__ = ("index", "latent", "prefix")

    def __init__(self, index: int, latent: int, prefix: tuple):
        self.index, self.latent, self.prefix = index, latent, prefix

    def __repr__(self) -> str:
        return f"Unique({self.index}, {self.prefix})"


def _distinct_latents(z: torch.Tensor):
    """z [R, N, d] → (the distinct latents of each row [C, d] in first-seen order, row of each [C],
    how many candidates each is [C], which one each candidate is [R][N]). Identical candidates (a
    deterministic head) are decoded once."""
    r, n, d = z.shape
    flat = z.reshape(r * n, d)
    _, inverse = torch.unique(flat, dim=0, return_inverse=True)
    index: dict[tuple[int, int], int] = {}
    first, row_of, mult, which = [], [], [], [[0] * n for _ in range(r)]
    for i, same in enumerate(inverse.tolist()):
        c = index.setdefault((i // n, same), len(first))
        if c == len(first):
            first.append(i)
            row_of.append(i // n)
            mult.append(0)
        mult[c] += 1
        which[i // n][i % n] = c
    return flat[torch.tensor(first, device=z.device)], row_of, mult, which


FEW_ROWS = 32  # decoder rows that cost about what one does (the screen only reads the projection)


def _prunable(ae) -> bool:
    return hasattr(ae, "token_argmax") and hasattr(getattr(ae, "decoder", None), "chunk_states")


def candidate_keys(ae, z: torch.Tensor, ahead: Optional[Sequence[int]] = None) -> tuple[list[list], object]:
    """z [R, N, d] (N candidate latents for each of R rows) → (keys: per row N entries, a K-token
    tuple or a :class:`Unique`; the state :func:`complete` needs). ``ahead[i]``: a candidate of row i
    decoded to the end in the first pass (the one chosen if all of the row's chunks are unique, which
    then needs no pass of its own)."""
    if not _prunable(ae):
        with record_function("generate.decode"):
            tokens = ae.decode(z.unsqueeze(-2)).argmax(-1).tolist()  # [R, N, K]
        return [[tuple(c) for c in row] for row in tokens], None
    with record_function("generate.decode"):
        latents, row_of, mult, which = _distinct_latents(z)
        x = ae.decoder.chunk_states(latents)  # [C, K, H]
    k = x.shape[1]
    early = sorted({which[i][c] for i, c in enumerate(ahead or ())}) if k > 1 else []
    full: dict[int, tuple] = {}  # distinct latent → its K tokens, where decoded to the end
    prefixes = [()] * len(latents)
    alive = list(range(len(latents)))
    for j in range(k):
        if not alive:
            break
        need = [c for c in alive if c not in full]
        # Decoding few rows only reads the output projection: then all their remaining positions at once.
        whole = early if j == 0 else need if len(need) * (k - j) <= FEW_ROWS else []
        with record_function("generate.decode"):
            tok, ends = _decode(ae, x, [c for c in need if c not in whole], whole, j)
        with record_function("generate.choose"):
            full.update((c, prefixes[c] + tail) for c, tail in zip(whole, ends))
            tok = iter(tok)
            for c in alive:
                prefixes[c] = full[c][:j + 1] if c in full else prefixes[c] + (next(tok),)
            counts = Counter()
            for c in alive:
                counts[row_of[c], prefixes[c]] += mult[c]
            alive = [c for c in alive if counts[row_of[c], prefixes[c]] >= 2]
    shared = set(alive)  # decoded to the end and shared by two or more candidates of the row
    known = [full.get(c, p) for c, p in enumerate(prefixes)]
    keys = [[known[c] if c in shared else Unique(i, c, known[c]) for i, c in enumerate(row)] for row in which]
    return keys, x


def _decode(ae, x: torch.Tensor, part: list[int], whole: list[int], j: int) -> tuple[list, list]:
    """(the token at position j of each distinct latent in ``part``, the tokens at positions j..K-1 of
    each in ``whole`` as a tuple), in one pass over the output projection."""
    part_rows = x[torch.tensor(part, dtype=torch.long, device=x.device), j]
    whole_rows = x[torch.tensor(whole, dtype=torch.long, device=x.device), j:].reshape(-1, x.shape[-1])
    rows = torch.cat([part_rows, whole_rows])
    tok = ae.token_argmax(rows).tolist() if len(rows) else []
    n, span = len(part), x.shape[1] - j
    return tok[:n], [tuple(tok[n + e * span:n + (e + 1) * span]) for e in range(len(whole))]


def complete(ae, state, picks: list[tuple[int, object]]) -> list[tuple]:
    """The K tokens of each chosen key: picks [(row, key)] → tuples (every Unique's missing positions
    decoded together, in one pass over the output projection)."""
    out = [key.prefix if isinstance(key, Unique) else key for _, key in picks]
    todo = [(slot, key.latent, j) for slot, (_, key) in enumerate(picks) if isinstance(key, Unique)
            for j in range(len(key.prefix), state.shape[1])]
    if todo:
        with record_function("generate.decode"):
            latent, pos = (torch.tensor(col, device=state.device) for col in list(zip(*todo))[1:])
            tokens = ae.token_argmax(state[latent, pos]).tolist()
        for (slot, *_), tok in zip(todo, tokens):  # in position order within each slot
            out[slot] = out[slot] + (tok,)
    return out
