"""BrierLM estimators: unbiasedness against exact Brier scores of known distributions, the fixed
points (perfect and uniform predictors), the parallel roll-out against explicit forwards, and
smoke runs on tiny random CALM / Transformer models."""
import itertools
import math

import pytest
import torch
from torch import nn

from calm_pretrain.brier import (_ParallelRollout, _calm_estimates, _transformer_estimates, brier_calm, brier_lm,
                                 brier_transformer, evaluate_brier, merge_scores, two_sample_brier)
from calm_pretrain.config import load_config
from calm_pretrain.models import build_model
from tests.helpers import REPO
from tests.helpers.brier import brier_by_hand
from tests.helpers.models import tiny_model


# --------------------------------------------------------------------------------------------
# Fake models whose predictive distribution is a known Markov chain
# --------------------------------------------------------------------------------------------
class IdentityBackbone(nn.Module):
    """Hidden state = input embedding: the prediction depends on the current input only."""

    def __init__(self, embed_tokens=None):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, x, cache=None, positions=None, attn_mask=None):
        return x

    def new_cache(self):
        return None


def chunk_index(ids, k, v):
    """ids [..., K] → chunk id Σ t_j v^(K−1−j)."""
    weights = v ** torch.arange(k - 1, -1, -1)
    return (ids * weights).sum(-1)


def chunk_tokens(idx, k, v):
    """chunk ids [...] → tokens [..., K] (inverse of chunk_index)."""
    return torch.stack([(idx // v ** (k - 1 - j)) % v for j in range(k)], -1)


class MarkovHead(nn.Module):
    """Samples the next chunk from Q[current chunk]; returns its tokens one-hot as the 'latent'."""

    def __init__(self, q, k, v):
        super().__init__()
        self.register_buffer("q", q)
        self.k, self.v = k, v

    def sample(self, h, num_samples, generator=None):
        probs = h @ self.q  # h is the one-hot of the current chunk
        nxt = torch.multinomial(probs.reshape(-1, probs.shape[-1]), num_samples, replacement=True,
                                generator=generator).reshape(*h.shape[:-1], num_samples)
        onehot = nn.functional.one_hot(chunk_tokens(nxt, self.k, self.v), self.v).float()
        return onehot.flatten(-2)  # [..., S, K·V]


class MarkovCALM(nn.Module):
    """A CALM-shaped model whose next-chunk distribution is row `chunk i` of the matrix Q."""

    def __init__(self, q, k, v):
        super().__init__()
        self.k, self.v = k, v
        self.transformer = IdentityBackbone()
        self.head = MarkovHead(q, k, v)

    def embed_chunks(self, ids):
        b, t = ids.shape
        idx = chunk_index(ids.reshape(b, t // self.k, self.k), self.k, self.v)
        return nn.functional.one_hot(idx, self.v ** self.k).float()

    def hidden_states(self, ids, cache=None):
        return self.embed_chunks(ids)

    def new_cache(self):
        return None


class OneHotAE:
    """decode(z) = z read as K rows of logits: argmax returns the tokens the fake head encoded."""

    def __init__(self, k, v):
        self.k, self.v = k, v

    def decode(self, z):
        return z.reshape(*z.shape[:-2], z.shape[-2] * self.k, self.v)


class MarkovLM(nn.Module):
    """A TransformerLM-shaped bigram model: P(next | current) = Q[current]."""

    def __init__(self, q):
        super().__init__()
        v = q.shape[0]
        embed = nn.Embedding(v, v)
        embed.weight.data = torch.eye(v)
        self.transformer = IdentityBackbone(embed)
        self.lm_head = nn.Linear(v, v, bias=False)
        self.lm_head.weight.data = q.clamp(min=1e-30).log().clamp(min=-1e4).T.contiguous()


def exact_ngram_brier(q, k, v, context_chunk, gold_tokens, n):
    """Exact Brier-n by enumerating every continuation of ⌈n/K⌉ chunks of the chain Q."""
    steps = -(-n // k)
    dist = {}
    for seq in itertools.product(range(v ** k), repeat=steps):
        prob, prev = 1.0, context_chunk
        for c in seq:
            prob *= float(q[prev, c])
            prev = c
        tokens = tuple(t for c in seq for t in chunk_tokens(torch.tensor(c), k, v).tolist())[:n]
        dist[tokens] = dist.get(tokens, 0.0) + prob
    return 2 * dist.get(tuple(gold_tokens), 0.0) - sum(p * p for p in dist.values())


def random_chain(num_states, seed, power=3.0):
    """A random stochastic matrix with uneven rows (U^power, normalised), all entries > 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(num_states, num_states, generator=g, dtype=torch.float64) ** power + 1e-3
    return (x / x.sum(-1, keepdim=True)).float()


def draw_chain(q, start, length, g):
    out = [start]
    for _ in range(length - 1):
        out.append(int(torch.multinomial(q[out[-1]], 1, generator=g)))
    return out


# --------------------------------------------------------------------------------------------
# The core two-sample estimator against brute-force expectation
# --------------------------------------------------------------------------------------------
def test_two_sample_core_is_unbiased_by_enumeration():
    # A distribution over 2-token outcomes from V=3 tokens; exact expectation over (x1, x2) pairs.
    g = torch.Generator().manual_seed(0)
    outcomes = list(itertools.product(range(3), repeat=2))
    probs = torch.rand(len(outcomes), generator=g, dtype=torch.float64) ** 2
    probs /= probs.sum()
    for gold in outcomes:
        expect = torch.zeros(2, dtype=torch.float64)
        for (i, x1), (j, x2) in itertools.product(enumerate(outcomes), repeat=2):
            est = two_sample_brier(torch.tensor(x1), torch.tensor(x2), torch.tensor(gold))
            expect += probs[i] * probs[j] * est
        for n in (1, 2):
            marg = {}
            for o, p in zip(outcomes, probs.tolist()):
                marg[o[:n]] = marg.get(o[:n], 0.0) + p
            exact = 2 * marg.get(gold[:n], 0.0) - sum(p * p for p in marg.values())
            assert expect[n - 1].item() == pytest.approx(exact, abs=1e-12)


# --------------------------------------------------------------------------------------------
# Unbiasedness of the full estimators on known Markov models
# --------------------------------------------------------------------------------------------
def _check_unbiased(est, valid, exact, z=5.0):
    """est [B, P, max_n] i.i.d. over B; exact [P, max_n]. Every valid cell within z standard errors."""
    mean = est.mean(0)
    se = est.std(0) / math.sqrt(est.shape[0])
    for i, n in valid.nonzero().tolist():
        tol = z * float(se[i, n]) + 1e-6  # 1e-6: fp32 probabilities
        assert abs(float(mean[i, n]) - exact[i][n]) <= tol, (i, n + 1, float(mean[i, n]), exact[i][n], tol)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_brier_calm_unbiased_on_markov_chunks(k):
    v, n_chunks, reps, max_n = 3 if k < 3 else 2, 5, 20000, 4
    q = random_chain(v ** k, seed=k)
    gold_chunks = draw_chain(q, 0, n_chunks, torch.Generator().manual_seed(10 + k))
    gold = chunk_tokens(torch.tensor(gold_chunks), k, v).reshape(-1)  # [N·K]
    ids = gold.expand(reps, -1).contiguous()  # identical rows = independent replicates

    model, ae = MarkovCALM(q, k, v), OneHotAE(k, v)
    est, valid = _calm_estimates(model, ae, ids, max_n, torch.Generator().manual_seed(0))
    exact = [[exact_ngram_brier(q, k, v, gold_chunks[i], gold[(i + 1) * k:(i + 1) * k + n].tolist(), n)
              if valid[i, n - 1] else None for n in range(1, max_n + 1)] for i in range(n_chunks - 1)]
    _check_unbiased(est, valid, exact)
    assert valid[:, -1].any(), "some start position must score 4-grams"


def test_brier_transformer_unbiased_on_markov_tokens():
    v, t, reps, max_n = 3, 7, 20000, 4
    q = random_chain(v, seed=3)
    gold = torch.tensor(draw_chain(q, 1, t, torch.Generator().manual_seed(4)))
    ids = gold.expand(reps, -1).contiguous()
    est, valid = _transformer_estimates(MarkovLM(q), ids, max_n, torch.Generator().manual_seed(0))
    exact = [[exact_ngram_brier(q, 1, v, int(gold[i]), gold[i + 1:i + 1 + n].tolist(), n)
              if valid[i, n - 1] else None for n in range(1, max_n + 1)] for i in range(t - 1)]
    _check_unbiased(est, valid, exact)
    # n = 1 uses exact probabilities only: zero variance.
    assert torch.allclose(est[:, :, 0], est[:1, :, 0].expand_as(est[:, :, 0]))


# --------------------------------------------------------------------------------------------
# Fixed points: perfect and uniform predictors
# --------------------------------------------------------------------------------------------
def _cycle(num_states):
    return torch.roll(torch.eye(num_states), 1, dims=1)  # state c → c+1 (mod C) with probability 1


def test_perfect_predictor_scores_100():
    # CALM, K=2 (n-grams cross chunks, so the roll-out runs): gold follows the deterministic cycle.
    k, v = 2, 3
    chunks = [(c + 1) % 9 for c in range(-1, 7)]
    ids = chunk_tokens(torch.tensor(chunks), k, v).reshape(1, -1)
    res = evaluate_brier(MarkovCALM(_cycle(v ** k), k, v), [ids, ids[0]], ae=OneHotAE(k, v))
    assert res["brierlm"] == pytest.approx(100.0)
    assert all(res[f"brier_{n}"] == pytest.approx(1.0) for n in range(1, 5))
    assert res["block_tokens"] == ids.shape[1] and res["num_blocks"] == 2

    tokens = torch.tensor([(i + 2) % 5 for i in range(12)])
    res = evaluate_brier(MarkovLM(_cycle(5)), [tokens], generator=torch.Generator().manual_seed(0))
    assert res["brierlm"] == pytest.approx(100.0, abs=1e-4)
    assert res["block_tokens"] == 12 and res["positions"] == [11, 10, 9, 8]


def test_uniform_transformer_matches_closed_form():
    # Uniform over V: P(n-gram) = V^-n for every n-gram, so Brier-n = 2V^-n − V^n·V^-2n = V^-n
    # and BrierLM = 100·(Π_n V^-n)^(1/4) = 100·V^-2.5.
    v = 4
    model = build_model(load_config(REPO / "configs/tiny/transformer.yaml", [f"model.vocab_size={v}"]).model)
    nn.init.zeros_(model.lm_head.weight)
    ids = torch.randint(0, v, (64, 129), generator=torch.Generator().manual_seed(0))
    est, valid = _transformer_estimates(model, ids, 4, torch.Generator().manual_seed(1))
    assert torch.allclose(est[:, :, 0], torch.full_like(est[:, :, 0], 1 / v))  # exact, no sampling
    for n in range(2, 5):
        vals = est[:, valid[:, n - 1], n - 1].reshape(-1)  # all positions i.i.d. for a uniform model
        se = vals.std() / math.sqrt(vals.numel())
        assert abs(vals.mean() - v ** -n) < 5 * se, (n, vals.mean(), v ** -n, se)
    res = brier_lm(brier_transformer(model, ids, 4, torch.Generator().manual_seed(1)))
    assert res["brierlm"] == pytest.approx(100 * v ** -2.5, rel=0.15)


def test_uniform_calm_matches_closed_form():
    k, v = 2, 3
    model, ae = MarkovCALM(torch.full((9, 9), 1 / 9), k, v), OneHotAE(k, v)
    ids = torch.randint(0, v, (20000, 12), generator=torch.Generator().manual_seed(0))
    est, valid = _calm_estimates(model, ae, ids, 4, torch.Generator().manual_seed(1))
    for n in range(1, 5):
        vals = est[:, valid[:, n - 1], n - 1].reshape(-1)
        se = vals.std() / math.sqrt(vals.numel() / ids.shape[1] * 2)  # conservative: positions share samples
        assert abs(vals.mean() - v ** -n) < 5 * se, (n, vals.mean(), v ** -n)
    res = brier_lm(brier_calm(model, ae, ids, 4, torch.Generator().manual_seed(2)))
    assert res["brierlm"] == pytest.approx(100 * v ** -2.5, rel=0.1)


def test_brier_lm_aggregation():
    a = {"sum": torch.tensor([3.0, 2.0], dtype=torch.float64), "count": torch.tensor([4, 4])}
    b = {"sum": torch.tensor([1.0, -1.0], dtype=torch.float64), "count": torch.tensor([4, 2])}
    res = brier_lm(merge_scores(merge_scores(None, a), b))
    assert res["brier_1"] == pytest.approx(0.5) and res["brier_2"] == pytest.approx(1 / 6)
    assert res["brierlm"] == pytest.approx(100 * math.sqrt(0.5 / 6))
    neg = brier_lm({"sum": torch.tensor([1.0, -1.0], dtype=torch.float64), "count": torch.tensor([2, 2])})
    assert neg["brierlm"] == 0.0  # max(Brier-n, 0) before the geometric mean


# --------------------------------------------------------------------------------------------
# Real tiny models
# --------------------------------------------------------------------------------------------

def _tiny_calm(k, vocab=4096):
    calm = tiny_model("calm", f"model.k={k}", f"model.vocab_size={vocab}")
    ae = tiny_model("ae", f"model.k={k}", f"model.vocab_size={vocab}")
    nn.init.normal_(calm.head.final_layer.linears[2].weight, std=0.5)  # the zero-init head would be constant
    return calm, ae


@torch.no_grad()
def test_parallel_rollout_matches_explicit_forward():
    # Tracks continued from several start positions at once must see exactly gold[:i+1] + track.
    for model, embed, k in [(tiny_model("transformer"), None, 1), (*_tiny_calm(2)[:1], None, 2)]:
        embed = model.embed_chunks if k > 1 else model.transformer.embed_tokens
        g = torch.Generator().manual_seed(0)
        gold = torch.randint(3, 4096, (2, 7 * k), generator=g)
        roll = _ParallelRollout(model.transformer, embed(gold))
        tracks = {i: [] for i in range(6)}
        for step, starts in enumerate([[0, 1, 2, 3, 4, 5], [0, 2, 3], [3]]):
            feed = torch.randint(3, 4096, (2, len(starts), k), generator=g)
            h = roll.extend(torch.tensor(starts), embed(feed.reshape(2, -1)))
            for j, i in enumerate(starts):
                tracks[i].append(feed[:, j])
                seq = torch.cat([gold[:, :(i + 1) * k], *tracks[i]], 1)
                ref = model.transformer(embed(seq))[:, -1]
                torch.testing.assert_close(h[:, j], ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("k", [4, 2, 1])
def test_brier_calm_runs_on_tiny_models(k):
    calm, ae = _tiny_calm(k, vocab=16)  # a small vocabulary so that some predictions hit
    ids = torch.randint(0, 16, (2, 48), generator=torch.Generator().manual_seed(0))
    scores = brier_calm(calm, ae, ids, 4, torch.Generator().manual_seed(0))
    n_chunks = 48 // k
    expected = [2 * sum((i + 1) * k + n <= 48 for i in range(n_chunks - 1)) for n in range(1, 5)]
    assert scores["count"].tolist() == expected
    res = brier_lm(scores)
    briers, brierlm = brier_by_hand(scores)  # and the sums are whole numbers within the counts
    assert [res[f"brier_{n}"] for n in range(1, 5)] == pytest.approx(briers, abs=1e-12)
    assert res["brierlm"] == pytest.approx(brierlm, abs=1e-9)
    again = brier_calm(calm, ae, ids, 4, torch.Generator().manual_seed(0))
    assert torch.equal(again["sum"], scores["sum"])  # deterministic given the generator


def test_brier_transformer_runs_on_tiny_model():
    model = tiny_model("transformer", "model.vocab_size=16")
    blocks = [torch.randint(0, 16, (40,), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    res = evaluate_brier(model, blocks, generator=torch.Generator().manual_seed(0))
    assert res["positions"] == [3 * 39, 3 * 38, 3 * 37, 3 * 36] and res["block_tokens"] == 40
    for n in range(1, 5):
        assert -1.0 <= res[f"brier_{n}"] <= 2.0
    assert 0.0 <= res["brierlm"] <= 200.0
    # A near-uniform untrained model: Brier-1 ≈ 2/V − 1/V.
    assert res["brier_1"] == pytest.approx(1 / 16, rel=0.3)


def test_pooled_draws_stay_unbiased_and_keep_the_block_as_the_cluster():
    from calm_pretrain.brier import evaluate_brier

    v, t, max_n = 3, 9, 4
    q = random_chain(v, seed=5)
    blocks = [torch.tensor(draw_chain(q, s % v, t, torch.Generator().manual_seed(10 + s)))[None] for s in range(6)]
    exact = []  # brute force over every continuation, averaged over the scored (block, start) pairs
    for n in range(1, max_n + 1):
        vals = [exact_ngram_brier(q, 1, v, int(b[0, i]), b[0, i + 1:i + 1 + n].tolist(), n)
                for b in blocks for i in range(t - n)]
        exact.append(sum(vals) / len(vals))
    one = evaluate_brier(MarkovLM(q), blocks, max_n=max_n, generator=torch.Generator().manual_seed(0))
    many = evaluate_brier(MarkovLM(q), blocks, max_n=max_n, generator=torch.Generator().manual_seed(1), draws=400)
    assert many["draws"] == 400 and many["num_blocks"] == one["num_blocks"] == 6
    assert many["positions"] == [400 * c for c in one["positions"]]
    for n in range(1, max_n + 1):
        assert abs(many[f"brier_{n}"] - exact[n - 1]) < 0.02, (n, many[f"brier_{n}"], exact[n - 1])
        assert abs(many[f"brier_{n}"] - exact[n - 1]) < 3 * many[f"brier_{n}_se"] + 1e-9
