"""BrierLM: a sample-based, strictly proper language-model score (docs/method.md, 'BrierLM').

Brier(P, y) = 2·P(y) − Σ_x P(x)², higher is better, at most 1. Brier-n scores the model's
distribution over the next n tokens given a gold context; BrierLM = 100 · geometric mean of
max(Brier-n, 0) over n = 1..4, each Brier-n averaged over all scored positions first.

A CALM has no tractable likelihood, so it is scored with the unbiased two-sample estimator
1[x₁=y] + 1[x₂=y] − 1[x₁=x₂] (x₁, x₂ ~ P independently). The Transformer baseline uses the
variance-reduced estimator that plugs in its exact next-token probabilities.

The estimators return per-n *sums and counts* so that callers can aggregate over blocks, batches
and data-parallel ranks before taking means (see :func:`brier_lm`).

Roll-outs. When an n-gram is longer than one prediction step (every n ≥ 2 for the Transformer,
n > K for CALM), the collision term needs samples from the model's own continuation of each start
position. All start positions of a block are rolled out side by side: the gold block is run once
into a KV cache, then every start position i owns a "track" of fed-back samples whose queries see
gold positions ≤ i and their own track only (:class:`_ParallelRollout`).
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Iterable, Optional

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------
# Core estimator and aggregation
# --------------------------------------------------------------------------------------------
def two_sample_brier(pred1: torch.Tensor, pred2: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """Per-prefix two-sample Brier estimates: acc₁ + acc₂ − collision.

    pred1, pred2, gold: integer tensors [..., L] (two independent model samples of an L-token
    continuation and the gold continuation). Returns float [..., L] whose entry n−1 is the
    estimate of Brier-n: with x_j ~ P independently, E[1[x₁=y] + 1[x₂=y] − 1[x₁=x₂]]
    = 2P(y) − Σ_x P(x)². Prefix indicators are cumulative products of per-token matches.
    """
    acc1 = (pred1 == gold).long().cumprod(-1)
    acc2 = (pred2 == gold).long().cumprod(-1)
    collision = (pred1 == pred2).long().cumprod(-1)
    return (acc1 + acc2 - collision).to(torch.float64)


def _totals(est: torch.Tensor, valid: torch.Tensor) -> dict:
    """est [B, P, max_n], valid [P, max_n] (bool) → {"sum", "sumsq": float64[max_n], "count": int64[max_n]}."""
    valid = valid.to(est.device)
    est = est.to(torch.float64) * valid
    count = valid.sum(0).to(torch.int64) * est.shape[0]
    block_sum = est.sum(1).cpu()  # [B, max_n]: each row of ids is one block (a cluster of positions)
    return {"sum": est.sum(dim=(0, 1)).cpu(), "sumsq": est.square().sum(dim=(0, 1)).cpu(), "count": count.cpu(),
            "block_sum": block_sum, "block_count": valid.sum(0).to(torch.int64).cpu().expand_as(block_sum).clone()}


def merge_scores(a: Optional[dict], b: dict) -> dict:
    """Add two {"sum", "sumsq", "count"} results (``a`` may be None); per-block entries are joined."""
    if a is None:
        return {key: v.clone() for key, v in b.items()}
    return {key: torch.cat([a[key], b[key]]) if key.startswith("block_") else a[key] + b[key] for key in b}


def ratio_standard_error(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """Standard error of sum(num) / sum(den) over G clusters (rows; [G] or [G, ...]): the linearised
    variance G/(G−1) · Σ_g (num_g − R·den_g)² / (Σ den)². Positions of one eval block share a document,
    so they are not independent; clustering by block accounts for that (measured on the main job's
    811 held-out blocks of 256 tokens: 1.25x the per-position error of the energy skill, 1.1x of
    Brier-1). NaN with fewer than 2 clusters."""
    num, den = num.to(torch.float64), den.to(torch.float64)
    g = num.shape[0]
    if g < 2:
        return torch.full(num.shape[1:], float("nan"), dtype=torch.float64)
    total = den.sum(0)
    ratio = num.sum(0) / total
    resid = num - ratio * den
    return (g / (g - 1) * resid.square().sum(0)).sqrt() / total


def brier_lm(scores: dict) -> dict:
    """{"sum", "count"[, "sumsq"]} → {"brier_1": ..., "brier_n": ..., "brierlm": ...}.

    brier_n is the position-averaged Brier-n (a fraction, at most 1); brierlm is 100 × the
    geometric mean of max(brier_n, 0) over every n in ``scores`` (n = 1..4 by default). A Brier-n
    with no scored positions is NaN and makes BrierLM NaN. With "sumsq", each brier_n also gets its
    standard error, brier_n_se: clustered by block when "block_sum" holds two blocks or more
    (:func:`ratio_standard_error`), else over positions treated as independent.
    """
    total = scores["sum"].to(torch.float64)
    count = scores["count"].to(torch.float64)
    means = torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))
    out = {f"brier_{n + 1}": float(m) for n, m in enumerate(means)}
    if "sumsq" in scores:
        var = (scores["sumsq"].to(torch.float64) - count * means.square()) / (count - 1).clamp(min=1)
        se = torch.where(count > 1, (var.clamp(min=0) / count.clamp(min=1)).sqrt(), torch.full_like(total, float("nan")))
        if "block_sum" in scores and scores["block_sum"].shape[0] >= 2:
            se = ratio_standard_error(scores["block_sum"], scores["block_count"])
        out.update({f"brier_{n + 1}_se": float(v) for n, v in enumerate(se)})
    clipped = means.clamp(min=0.0)  # the reference takes max(·, 0) before the geometric mean
    if torch.isnan(means).any():
        out["brierlm"] = float("nan")
    elif (clipped == 0).any():
        out["brierlm"] = 0.0
    else:
        out["brierlm"] = 100.0 * float(torch.exp(torch.log(clipped).mean()))
    return out


# --------------------------------------------------------------------------------------------
# Parallel roll-outs over all start positions of a block
# --------------------------------------------------------------------------------------------
class _ParallelRollout:
    """Run a gold block once into a KV cache, then continue many start positions side by side.

    Start position i owns a track: the inputs fed after gold position i. At roll-out step s the
    track's query sits at position i + s and attends to gold keys at positions ≤ i and to its own
    track's keys (steps 1..s) — exactly what an explicit forward over gold[:i+1] + track would
    see. Each step may continue any subset of the previous step's starts (dead tracks are dropped).
    """

    def __init__(self, backbone, gold_embeds: torch.Tensor):
        self.backbone = backbone
        self.cache = backbone.new_cache()
        self.hidden = backbone(gold_embeds, self.cache)  # [B, N, H]
        n, device = gold_embeds.shape[1], gold_embeds.device
        self.key_track = torch.full((n,), -1, dtype=torch.long, device=device)  # -1: gold key
        self.key_pos = torch.arange(n, device=device)
        self.steps = 0

    def extend(self, starts: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """starts [M] (start positions, a subset of the previous step's), embeds [B, M, H] → hidden [B, M, H]."""
        self.steps += 1
        pos = starts + self.steps
        key_track = torch.cat([self.key_track, starts])
        key_pos = torch.cat([self.key_pos, pos])
        sees_gold = (key_track[None, :] == -1) & (key_pos[None, :] <= starts[:, None])
        own_track = key_track[None, :] == starts[:, None]
        h = self.backbone(embeds, self.cache, positions=pos, attn_mask=sees_gold | own_track)
        self.key_track, self.key_pos = key_track, key_pos
        return h


# --------------------------------------------------------------------------------------------
# CALM
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def _sample_chunks(calm, ae, h: torch.Tensor, num_samples: int, generator=None,
                   decode_rows: int = 256) -> torch.Tensor:
    """h [B, M, H] → AE-argmax tokens of head samples [B, M, num_samples, K].

    Decoding is done in slices of positions: logits of all samples at once would be
    [B, M, S, K, V], many GB at V = 128k.
    """
    z = calm.head.sample(h, num_samples, generator=generator)  # [B, M, S, d]
    out = []
    for lo in range(0, z.shape[1], decode_rows):
        logits = ae.decode(z[:, lo: lo + decode_rows].unsqueeze(-2))  # one chunk per latent: [B, m, S, K, V]
        out.append(logits.argmax(-1))
    return torch.cat(out, dim=1)


@torch.no_grad()
def _calm_estimates(calm, ae, ids: torch.Tensor, max_n: int = 4, generator=None):
    """Per-position two-sample estimates for a CALM: (est [B, P, max_n], valid [P, max_n]).

    Start position i (chunk i's hidden state, i = 0..N−2) scores the n-gram that begins chunk i+1.
    K ≥ max_n: one step; two head samples per position, decoded, compared within the chunk.
    K < max_n: the n-gram spans S = ⌈max_n/K⌉ chunks.
      * Accuracy: sample j's n-gram is read off the teacher-forced samples j at positions
        i, i+1, …, i+S−1 (each given the gold context). Samples at different positions are
        independent, so E[Π 1[match]] = Π P(y_t | gold prefix) = P(y) for each j.
      * Collision: one roll-out along sample 1's path, drawing two fresh samples per step from
        that path's context and comparing them. While the two n-gram samples agree their contexts
        are identical, so this has the law of two independent roll-outs from the gold prefix
        (E = Σ_x P(x)²); once they disagree the indicator is 0 whatever comes next — so those
        tracks are dropped, and the roll-out stops when all tracks have diverged.
    """
    k = calm.k
    b, t = ids.shape
    if t % k:
        raise ValueError(f"block length {t} is not a multiple of K={k}")
    n_chunks = t // k
    p = n_chunks - 1  # start positions: every chunk but the last predicts the next one
    if p < 1:
        raise ValueError(f"a block needs at least 2 chunks (got {t} tokens with K={k})")
    steps = -(-max_n // k)  # chunks an n-gram can span
    device = ids.device

    starts = torch.arange(p, device=device)
    n = torch.arange(1, max_n + 1, device=device)
    valid = (starts[:, None] + 1) * k + n[None, :] <= t  # the gold n-gram lies inside the block

    if steps == 1:
        rollout, h = None, calm.hidden_states(ids)
    else:
        rollout = _ParallelRollout(calm.transformer, calm.embed_chunks(ids))
        h = rollout.hidden
    x = _sample_chunks(calm, ae, h[:, :p], 2, generator)  # [B, P, 2, K]
    gold = ids[:, k:].reshape(b, p, k)

    # Accuracy: windows of S consecutive teacher-forced predictions; past the block nothing matches.
    pad_pred = torch.full((b, steps - 1, 2, k), -1, dtype=x.dtype, device=device)
    pad_gold = torch.full((b, steps - 1, k), -2, dtype=gold.dtype, device=device)
    xs, golds = torch.cat([x, pad_pred], 1), torch.cat([gold, pad_gold], 1)
    win_pred = torch.cat([xs[:, s: s + p] for s in range(steps)], dim=-1)  # [B, P, 2, S·K]
    win_gold = torch.cat([golds[:, s: s + p] for s in range(steps)], dim=-1)  # [B, P, S·K]
    acc = (win_pred == win_gold[:, :, None]).long().cumprod(-1)[..., :max_n]  # [B, P, 2, max_n]

    # Collision: step 0 uses the same two samples; later steps roll out along sample 1's path.
    agree = [x[:, :, 0] == x[:, :, 1]]  # per step: [B, P, K]
    path = x[:, :, 0]  # the chunk fed back at the next step
    for s in range(1, steps):
        alive = torch.stack(agree, -2).flatten(-2).all(-1).any(0)  # [P]: some row still agrees
        alive &= starts + s <= n_chunks - 2  # the track's n-grams can reach step s inside the block
        rows = alive.nonzero().squeeze(-1)
        if rows.numel() == 0:
            agree.extend(torch.zeros_like(agree[0]) for _ in range(s, steps))
            break
        hs = rollout.extend(rows, calm.embed_chunks(path[:, rows].reshape(b, -1)))
        xs_step = _sample_chunks(calm, ae, hs, 2, generator)  # [B, M, 2, K]
        step_agree = torch.zeros_like(agree[0])
        step_agree[:, rows] = xs_step[:, :, 0] == xs_step[:, :, 1]
        agree.append(step_agree)
        path = torch.full_like(path, -1)
        path[:, rows] = xs_step[:, :, 0]
    collision = torch.cat(agree, -1).long().cumprod(-1)[..., :max_n]  # [B, P, max_n]

    est = (acc[:, :, 0] + acc[:, :, 1] - collision).to(torch.float64)
    return est, valid


def brier_calm(calm, ae, ids: torch.Tensor, max_n: int = 4, generator: Optional[torch.Generator] = None) -> dict:
    """Two-sample BrierLM sums for a CALM on token blocks ids [B, T] (T a multiple of K).

    Scored at chunk-aligned start positions only (as the reference does). Returns
    {"sum": float64[max_n], "count": int64[max_n]}; see :func:`brier_lm`.
    """
    est, valid = _calm_estimates(calm, ae, ids, max_n, generator)
    return _totals(est, valid)


# --------------------------------------------------------------------------------------------
# Transformer baseline
# --------------------------------------------------------------------------------------------
def _sample_tokens(probs: torch.Tensor, num_samples: int, generator=None) -> torch.Tensor:
    """probs [..., V] → samples [..., num_samples]."""
    flat = probs.reshape(-1, probs.shape[-1])
    out = torch.multinomial(flat, num_samples, replacement=True, generator=generator)
    return out.reshape(*probs.shape[:-1], num_samples)


@torch.no_grad()
def _transformer_estimates(model, ids: torch.Tensor, max_n: int = 4, generator=None):
    """Variance-reduced per-position estimates: (est [B, P, max_n], valid [P, max_n]).

    Start position i (i = 0..T−2) scores tokens i+1..i+n:
      Brier-n ≈ 2·Π_{t≤n} P(y_t | gold prefix) − 1[two samples agree on tokens 1..n−1]·Σ_x P(x | sample-1 prefix)²
    The first term is exact (teacher forcing). In the second, the n−1 shared tokens are drawn
    along sample 1's path (two fresh samples per step, as for CALM), and the last token's
    collision probability is computed exactly, so its expectation is Σ_x P(x)² over n-grams.
    """
    b, t = ids.shape
    p = t - 1
    if p < 1:
        raise ValueError("a block needs at least 2 tokens")
    device = ids.device
    starts = torch.arange(p, device=device)
    n = torch.arange(1, max_n + 1, device=device)
    valid = starts[:, None] + n[None, :] <= t - 1

    embed = model.transformer.embed_tokens
    rollout = _ParallelRollout(model.transformer, embed(ids))
    logp = F.log_softmax(model.lm_head(rollout.hidden[:, :p]).float(), dim=-1)  # [B, P, V]

    # Accuracy: Π over windows of teacher-forced gold log-probabilities (−inf past the block).
    gold_lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, P]
    gold_lp = torch.cat([gold_lp, gold_lp.new_full((b, max_n - 1), -math.inf)], 1)
    acc = torch.stack([gold_lp[:, s: s + p] for s in range(max_n)], -1).cumsum(-1).exp()  # [B, P, max_n]

    collision = torch.zeros(b, p, max_n, dtype=torch.float32, device=device)
    probs = logp.exp()
    collision[..., 0] = probs.pow(2).sum(-1)
    agree = torch.ones(b, p, dtype=torch.bool, device=device)  # sampled prefixes agree so far
    rows = starts  # start positions whose next-token distribution is `probs`
    for s in range(1, max_n):
        pair = _sample_tokens(probs, 2, generator)  # [B, M, 2]: token s of the two samples
        step_agree = torch.zeros_like(agree)
        step_agree[:, rows] = pair[..., 0] == pair[..., 1]
        agree &= step_agree
        path = torch.zeros(b, p, dtype=ids.dtype, device=device)
        path[:, rows] = pair[..., 0]  # sample 1's token, fed back
        rows = (agree.any(0) & (starts + s <= t - 2)).nonzero().squeeze(-1)  # n = s+1 must fit
        if rows.numel() == 0:
            break
        hs = rollout.extend(rows, embed(path[:, rows]))
        probs = F.softmax(model.lm_head(hs).float(), dim=-1)  # [B, M, V]
        collision[:, rows, s] = agree[:, rows] * probs.pow(2).sum(-1)

    est = 2.0 * acc.to(torch.float64) - collision.to(torch.float64)
    return est, valid


def brier_transformer(model, ids: torch.Tensor, max_n: int = 4,
                      generator: Optional[torch.Generator] = None) -> dict:
    """Variance-reduced BrierLM sums for a discrete LM on token blocks ids [B, T], at every start position."""
    est, valid = _transformer_estimates(model, ids, max_n, generator)
    return _totals(est, valid)


# --------------------------------------------------------------------------------------------
# Aggregation over an evaluation set
# --------------------------------------------------------------------------------------------
def _device(model) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate_brier(model, blocks: Iterable[torch.Tensor], ae=None, max_n: int = 4,
                   generator: Optional[torch.Generator] = None, draws: int = 1) -> dict:
    """BrierLM of ``model`` over token blocks ([T] or [B, T] tensors).

    ``draws`` > 1 scores every block that many times with independent model samples and pools them:
    each estimate is unbiased, so their mean is too, with less sampling noise (the noise that
    dominates Brier-3 and Brier-4 of a weak model). The block stays the cluster of the standard
    error: its totals are summed over the draws, not counted as new blocks.

    A CALM needs its autoencoder ``ae``; without one the model is scored as a discrete LM. A CALM
    block whose length is not a multiple of K loses its last partial chunk. The block size is part
    of the result because it changes BrierLM noticeably (docs/method.md, 'BrierLM'): ``block_tokens`` is the
    size of the blocks (a sorted list if they differ).
    """
    device = _device(model)
    total, sizes, num_blocks = None, set(), 0
    for block in blocks:
        ids = torch.as_tensor(block, device=device)
        if ids.dim() == 1:
            ids = ids[None]
        if ae is not None:
            ids = ids[:, : ids.shape[1] // model.k * model.k]
            if ids.shape[1] < 2 * model.k:
                continue
            score = functools.partial(brier_calm, model, ae, ids, max_n, generator)
        else:
            if ids.shape[1] < 2:
                continue
            score = functools.partial(brier_transformer, model, ids, max_n, generator)
        scores = score()
        for _ in range(draws - 1):  # the same block again: its per-block totals add up
            again = score()
            scores = {key: v + again[key] for key, v in scores.items()}
        total = merge_scores(total, scores)
        sizes.add(ids.shape[1])
        num_blocks += ids.shape[0]
    if total is None:
        raise ValueError("no evaluation block was long enough to score")
    result = brier_lm(total)
    result.update(
        block_tokens=sizes.pop() if len(sizes) == 1 else sorted(sizes),
        num_blocks=num_blocks,
        positions=[int(c) for c in total["count"]],
        scored_at="chunk starts" if ae is not None else "every token",
        draws=draws,
    )
    return result
