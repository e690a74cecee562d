"""Likelihood-free temperature sampling and text generation (docs/method.md, 'Likelihood-free temperature sampling').

A CALM can draw samples but cannot evaluate probabilities, so temperature T = 1/n is realised by
agreement between samples: n i.i.d. draws that all coincide are distributed ∝ P(x)^n.

* :func:`exact_temperature_sample` — exact rejection sampler for any 0 < T ≤ 1. For
  1/T = n + α (0 < α < 1) a Bernoulli-factory stage accepts the candidate with probability P(x)^α.
* :func:`batch_temperature_sample` — the reference's batch approximation over N decoded candidates.
* :func:`generate_calm` / :func:`generate_transformer` — autoregressive generation.

Random numbers come from an explicit ``torch.Generator`` (or a ``random.Random``) so that runs are
reproducible, and cached / uncached generation consume them identically.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from typing import Callable, Hashable, Optional, Sequence, Union

import torch
from torch.profiler import record_function

from calm_pretrain.candidates import candidate_keys, complete, decode_chunks
from calm_pretrain.head_precision import head_sampler

Rng = Union[torch.Generator, random.Random, None]


def _uniform(rng: Rng) -> float:
    """One U[0, 1) draw from a torch.Generator, a random.Random or torch's global RNG."""
    if isinstance(rng, random.Random):
        return rng.random()
    device = rng.device if isinstance(rng, torch.Generator) else "cpu"
    return float(torch.rand((), generator=rng, device=device, dtype=torch.float64))


def split_inverse_temperature(temperature: float, tol: float = 1e-9) -> tuple[int, float]:
    """1/T → (n, α) with 1/T = n + α, n ≥ 1, 0 ≤ α < 1 (α snapped to 0 near an integer)."""
    if not (0.0 < temperature <= 1.0):
        raise ValueError(f"temperature must be in (0, 1] for likelihood-free sampling, got {temperature}")
    inv = 1.0 / temperature
    n = round(inv)
    if abs(inv - n) < tol:
        return n, 0.0
    n = math.floor(inv)
    return n, inv - n


# --------------------------------------------------------------------------------------------
# Exact sampler
# --------------------------------------------------------------------------------------------
class _DrawBudget:
    def __init__(self, sampler: Callable[[], Hashable], max_draws: int):
        self.sampler, self.max_draws, self.draws = sampler, max_draws, 0

    def __call__(self) -> Hashable:
        if self.draws >= self.max_draws:
            raise RuntimeError(f"exact temperature sampling used up max_draws={self.max_draws} without "
                               "accepting; the distribution is too flat for this temperature")
        self.draws += 1
        return self.sampler()


def _bernoulli_power(draw: Callable[[], Hashable], x: Hashable, alpha: float, rng: Rng) -> bool:
    """A coin with P(heads) = P(x)^α (0 < α < 1) from draws of P: a Bernoulli factory.

    Binomial series: p^α = 1 − Σ_{k≥1} c_k (1−p)^k with c_k = α(1−α)(2−α)…(k−1−α)/k! ≥ 0 and
    Σ c_k = 1, i.e. c is a distribution (Sibuya(α)). With K ~ c and K draws, P(no draw equals x)
    = E[(1−p)^K] = 1 − p^α, so "some draw among the first K equals x" has probability p^α.
    K is drawn lazily: P(K = k | K ≥ k) = α/k, so we stop at the first success or at K.
    """
    k = 1
    while True:
        if draw() == x:
            return True
        if _uniform(rng) < alpha / k:  # K = k: all K draws missed x
            return False
        k += 1


def exact_temperature_sample(sampler: Callable[[], Hashable], temperature: float, rng: Rng = None,
                             max_draws: int = 1_000_000) -> Hashable:
    """Exact sample from P(x)^(1/T) / Z using only draws from ``sampler()`` (i.i.d. ~ P, hashable).

    1/T = n + α. Repeat: draw n samples; if they are all equal to some x (probability P(x)^n),
    accept x with probability P(x)^α (Bernoulli factory, α > 0 only); otherwise restart. The
    accepted x has probability ∝ P(x)^n · P(x)^α. ``rng`` drives only the factory's coin; the
    sampler owns its own randomness. Raises RuntimeError after ``max_draws`` calls to the sampler.
    """
    n, alpha = split_inverse_temperature(temperature)
    draw = _DrawBudget(sampler, max_draws)
    while True:
        x = draw()
        if all(draw() == x for _ in range(n - 1)):  # short-circuits at the first mismatch
            if alpha == 0.0 or _bernoulli_power(draw, x, alpha, rng):
                return x


# --------------------------------------------------------------------------------------------
# Batch approximation (the reference's `temperature_sampling`)
# --------------------------------------------------------------------------------------------
def batch_temperature_sample(candidates: Sequence[Hashable], n: int, rng: Rng = None) -> Hashable:
    """Pick one of N candidate outcomes (e.g. K-token tuples) approximating temperature T = 1/n.

    Count identical candidates; for m = n down to 1, the outcomes seen at least m times are
    eligible and one is chosen with probability ∝ C(count, m), stopping at the first non-empty m.
    C(count, n) counts the n-subsets of candidates that agree — the batch analogue of "n draws all
    equal" — so as N grows the choice tends to P^n / Z. n = 1 picks ∝ count (one plain sample).
    One uniform is drawn from ``rng`` (:func:`batch_temperature_choice` takes it given).
    """
    if n < 1:
        raise ValueError(f"n = 1/T must be a positive integer, got {n}")
    if not candidates:
        raise ValueError("no candidates to choose from")
    return batch_temperature_choice(candidates, n, _uniform(rng))


def batch_temperature_choice(candidates: Sequence[Hashable], n: int, u: float) -> Hashable:
    """:func:`batch_temperature_sample` with its uniform draw u ∈ [0, 1) given."""
    counts = Counter(candidates)
    outcomes = list(counts)  # first-seen order: deterministic given the candidates
    for m in range(n, 0, -1):
        weights = [math.comb(counts[x], m) for x in outcomes]  # exact ints; 0 below m
        total = sum(weights)
        if total == 0:
            continue
        target = u * total
        acc = 0.0
        for x, w in zip(outcomes, weights):
            acc += w
            if target < acc and w > 0:
                return x
        return next(x for x, w in zip(reversed(outcomes), reversed(weights)) if w > 0)  # rounding guard
    raise ValueError("no candidates to choose from")


def inverse_temperature(temperature: float) -> int:
    n, alpha = split_inverse_temperature(temperature)
    if alpha:
        raise ValueError(f"batch temperature sampling needs T = 1/n for an integer n, got T = {temperature}")
    return n


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------
def as_batch(prompt_ids) -> tuple[torch.Tensor, bool]:
    ids = torch.as_tensor(prompt_ids)
    if ids.dim() == 1:
        return ids[None], True
    if ids.dim() != 2:
        raise ValueError(f"prompt_ids must be [T] or [B, T], got shape {tuple(ids.shape)}")
    return ids, False


def finish_generation(ids: torch.Tensor, pad_id: int, single: bool):
    """Strip every pad token; rows may then differ in length, so a batch becomes a list."""
    rows = [row[row != pad_id] for row in ids]
    return rows[0] if single else rows


def truncate_after_eos(new: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """Replace everything after the first EOS of each row of generated tokens [B, L] by pad."""
    is_eos = new == eos_id
    after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return new.masked_fill(after, pad_id)


@torch.no_grad()
def calm_generation_setup(calm, prompt_ids, temperature: float, num_candidates: int, eos_id: Optional[int],
                          pad_id: Optional[int], sampler: str):
    """What a CALM generation loop starts from: (K, eos id, pad id, the batch sampler's n, head draws per
    chunk, device, the prompt as [B, T'] on the device right-padded to a multiple of K, whether it was
    one row)."""
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
    if ids.shape[1] == 0:
        raise ValueError("an empty prompt has no chunk to condition on")
    ids = torch.cat([ids, ids.new_full((ids.shape[0], -ids.shape[1] % k), pad_id)], 1)
    return k, eos_id, pad_id, n, num_draws, device, ids, single


@torch.no_grad()
def generate_calm(calm, ae, prompt_ids, max_new_tokens: int, temperature: float = 0.5,
                  num_candidates: int = 200, eos_id: Optional[int] = None, pad_id: Optional[int] = None,
                  use_cache: bool = True, generator: Optional[torch.Generator] = None, sampler: str = "batch",
                  on_chunk: Optional[Callable[[torch.Tensor], None]] = None, head_dtype: Optional[torch.dtype] = None,
                  packed_gemm: bool = True):
    """Sample a continuation from a CALM, one K-token chunk per step.

    The prompt ([T] or [B, T]) is right-padded with ``pad_id`` to a multiple of K. Each step:
    hidden state of the last chunk → ``num_candidates`` head samples (1 at T = 1) → AE argmax →
    :func:`batch_temperature_sample` → the chosen K tokens are appended and re-embedded (latents
    are never fed back). With ``sampler="exact"`` each row's chunk comes from
    :func:`exact_temperature_sample` over single head samples instead (any T in (0, 1]). A row stops
    after a chunk containing EOS (tokens after the EOS are dropped); generation ends when all rows
    stopped or ``max_new_tokens`` is reached. Pads are stripped from the returned prompt +
    continuation (a tensor for a 1-D prompt, else a list). ``on_chunk(chunk [B, K])`` sees each step's
    chunk as it is chosen (streaming).

    Per step, all rows go through the head in one call and the AE decoder in one batched pass; at
    T = 1 nothing is read back to the host but the all-rows-stopped flag. At T < 1 only what the
    count can depend on is decoded (calm_pretrain/candidates.py). Random numbers per step: the head's
    noise for every row, then one uniform per row (also at T = 1, where it is not needed, so that a
    seed gives what it gave before), the same draws as the one-row-at-a-time loop
    (calm_pretrain/sampling_reference.py) while no row has stopped.

    ``head_dtype`` (opt-in, not exact; default None: the head's own precision): run the energy head in
    that dtype, e.g. torch.bfloat16 (calm_pretrain/head_precision.py). Same random numbers, other
    arithmetic: some chunks differ from the default path's.

    ``packed_gemm`` (default on): at T < 1 the head's samples go through MKL's packed fp32 GEMM on the
    CPU (calm_pretrain/packed_gemm.py): the same fp32 arithmetic in another order of additions, 13-17%
    less time per GEMM at CALM-M's width. Off: ``F.linear``'s kernel.
    """
    k, eos_id, pad_id, n, num_draws, device, ids, single = calm_generation_setup(
        calm, prompt_ids, temperature, num_candidates, eos_id, pad_id, sampler)
    sample = head_sampler(calm.head, head_dtype, packed=packed_gemm and num_draws > 1)  # T = 1: one row each

    def step(h: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        if sampler == "exact":
            chunk = ids.new_full((h.shape[0], k), pad_id)
            for row in range(h.shape[0]):
                if not done[row]:
                    chunk[row] = torch.tensor(exact_chunk(sample, ae, h[row], temperature, generator),
                                              device=device)
            return chunk
        chunk = _batch_step(sample, calm.k, ae, h, n, num_draws, done, generator).to(ids.dtype)
        return chunk.masked_fill(done[:, None], pad_id)  # finished rows are padded, stripped at the end

    return calm_chunk_loop(calm, ids, max_new_tokens, use_cache, step, eos_id, pad_id, single, on_chunk)


def calm_chunk_loop(calm, ids: torch.Tensor, max_new_tokens: int, use_cache: bool, step: Callable, eos_id: int,
                    pad_id: int, single: bool, on_chunk: Optional[Callable[[torch.Tensor], None]]):
    """The loop a CALM sampler runs: embed the chunks not yet read (the prompt, then each chosen chunk),
    one backbone step, `step(h [B, H], done [B]) -> chunk [B, K]` chooses the next chunk; a row is done
    after a chunk with EOS, the loop after all rows are (read once per chunk) or max_new_tokens."""
    cache = calm.new_cache() if use_cache else None
    new_chunks: list[torch.Tensor] = []
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    feed = ids  # what the cached path still has to read
    for _ in range(-(-max_new_tokens // calm.k)):
        with record_function("generate.embed"):
            e = calm.embed_chunks(feed if use_cache else torch.cat([ids, *new_chunks], 1))
        with record_function("generate.backbone"):
            h = calm.transformer(e, cache)[:, -1]
        chunk = step(h, done)
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


def _batch_step(sample: Callable, k: int, ae, h: torch.Tensor, n: int, num_draws: int, done: torch.Tensor,
                generator) -> torch.Tensor:
    """One step of the batch sampler for every row: h [B, H] → chunk [B, K] (rows in ``done``: anything);
    ``sample`` is the head's ``sample`` (or :func:`~calm_pretrain.head_precision.head_sampler`'s)."""
    with record_function("generate.head"):
        z = sample(h, num_draws, generator=generator)  # [B, N, d]
    u = torch.rand(h.shape[0], generator=generator, device=h.device, dtype=torch.float64)
    if num_draws == 1:  # T = 1: the one candidate is the choice
        return decode_chunks(ae, z[:, 0])
    live = (~done).nonzero().flatten().tolist()
    u = u[live].tolist()
    if_all_unique = [batch_temperature_choice(range(num_draws), n, x) for x in u]  # the choice among N distinct
    keys, state = candidate_keys(ae, z[live], ahead=if_all_unique)
    with record_function("generate.choose"):
        picks = [(i, batch_temperature_choice(row_keys, n, x)) for i, (row_keys, x) in enumerate(zip(keys, u))]
    chunk = torch.zeros(h.shape[0], k, dtype=torch.long, device=h.device)
    if live:
        chunk[live] = torch.tensor(complete(ae, state, picks), device=h.device)
    return chunk


def exact_chunk(sample: Callable, ae, h: torch.Tensor, temperature: float, generator) -> tuple:
    """One chunk from the exact sampler: each draw is one head sample (``sample``, the head's) of hidden
    state h [H], decoded."""
    def draw() -> tuple:
        with record_function("generate.head"):
            z = sample(h[None], 1, generator=generator)  # [1, 1, d]
        return tuple(decode_chunks(ae, z[0, 0]).tolist())
    return exact_temperature_sample(draw, temperature, generator)


@torch.no_grad()
def generate_transformer(model, prompt_ids, max_new_tokens: int, temperature: float = 1.0,
                         eos_id: Optional[int] = None, pad_id: Optional[int] = None, use_cache: bool = True,
                         generator: Optional[torch.Generator] = None, top_p: float = 1.0,
                         on_chunk: Optional[Callable[[torch.Tensor], None]] = None):
    """Softmax temperature sampling from a discrete LM (T = 0: greedy), optionally restricted to the
    smallest set of tokens whose probability reaches ``top_p`` (nucleus sampling). Same stopping, return
    and streaming (``on_chunk``, one token per step) conventions as :func:`generate_calm`."""
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    cfg = model.config
    eos_id = cfg.eos_token_id if eos_id is None else eos_id
    pad_id = cfg.pad_token_id if pad_id is None else pad_id
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    device = next(model.parameters()).device

    ids, single = as_batch(prompt_ids)
    ids = ids.to(device)
    b = ids.shape[0]
    cache = model.new_cache() if use_cache else None
    new_tokens: list[torch.Tensor] = []
    done = torch.zeros(b, dtype=torch.bool, device=device)
    feed = ids
    for _ in range(max_new_tokens):
        if use_cache:
            logits = model.logits(feed, cache)[:, -1].float()
        else:
            logits = model.logits(torch.cat([ids, *new_tokens], 1))[:, -1].float()
        # Draw the uniform even when greedy so RNG use does not depend on the path taken.
        u = torch.rand(b, 1, generator=generator, device=device, dtype=torch.float64)
        if temperature == 0:
            tok = logits.argmax(-1)
        else:
            # Inverse CDF with one explicit uniform per row: the same draws in cached/uncached runs.
            probs = torch.softmax(logits.double() / temperature, -1)
            if top_p < 1:
                probs = _nucleus(probs, top_p)
            cdf = probs.cumsum(-1)
            tok = (cdf < u * cdf[:, -1:]).sum(-1).clamp(max=logits.shape[-1] - 1)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        new_tokens.append(tok[:, None].to(ids.dtype))
        if on_chunk is not None:
            on_chunk(new_tokens[-1])
        feed = new_tokens[-1]
        done |= tok == eos_id
        if done.all():
            break

    new = torch.cat(new_tokens, 1) if new_tokens else ids[:, :0]
    return finish_generation(torch.cat([ids, new], 1), pad_id, single)


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs [B, V] with everything outside the smallest top-p set zeroed (not renormalised: the
    inverse-CDF draw scales by the remaining total)."""
    sorted_p, order = probs.sort(-1, descending=True)
    keep_sorted = sorted_p.cumsum(-1) - sorted_p < top_p  # a token is kept if the mass before it is < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return probs * keep
