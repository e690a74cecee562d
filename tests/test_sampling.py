"""Likelihood-free temperature sampling (exact and batch) and generation with tiny models."""
import itertools
import math
import random
from collections import Counter

import pytest
import torch
from scipy import stats
from torch import nn

from calm_pretrain.sampling import (_bernoulli_power, batch_temperature_sample, exact_temperature_sample,
                                    generate_calm, generate_transformer)
from tests.helpers.models import tiny_model

P = [0.35, 0.25, 0.2, 0.12, 0.08]  # a toy black-box distribution over 5 outcomes
OUTCOMES = ["a", "b", "c", "d", "e"]


def toy_sampler(seed):
    r = random.Random(seed)
    return lambda: r.choices(OUTCOMES, weights=P)[0]


def tempered(p, power):
    w = [x ** power for x in p]
    return [x / sum(w) for x in w]


def assert_matches(samples, expected_probs, p_min=1e-3):
    counts = Counter(samples)
    obs = [counts[o] for o in OUTCOMES]
    exp = [q * len(samples) for q in expected_probs]
    assert min(exp) >= 5, "chi-square needs expected counts >= 5"
    p = stats.chisquare(obs, exp).pvalue
    assert p > p_min, (obs, [round(e) for e in exp], p)


# --------------------------------------------------------------------------------------------
# Exact sampler
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3])
def test_exact_sampler_integer_inverse_temperature(n):
    sampler = toy_sampler(n)
    samples = [exact_temperature_sample(sampler, 1 / n) for _ in range(6000)]
    assert_matches(samples, tempered(P, n))


@pytest.mark.parametrize("inv_t", [1.5, 2.4])
def test_exact_sampler_fractional_inverse_temperature(inv_t):
    sampler, rng = toy_sampler(7), random.Random(8)
    samples = [exact_temperature_sample(sampler, 1 / inv_t, rng=rng) for _ in range(6000)]
    assert_matches(samples, tempered(P, inv_t))
    # The untempered distribution is clearly rejected: the test has power.
    counts = Counter(samples)
    assert stats.chisquare([counts[o] for o in OUTCOMES], [q * 6000 for q in P]).pvalue < 1e-6


def test_bernoulli_factory_probability():
    # P(heads) = p^α for a coin built from draws of P, for several (p, α).
    g = torch.Generator().manual_seed(0)
    for seed, (x, alpha) in enumerate([("a", 0.3), ("d", 0.5), ("e", 0.9)]):
        sampler = toy_sampler(seed)
        trials = 4000
        heads = sum(_bernoulli_power(sampler, x, alpha, g) for _ in range(trials))
        p = P[OUTCOMES.index(x)] ** alpha
        assert stats.binomtest(heads, trials, p).pvalue > 1e-3, (x, alpha, heads / trials, p)


def test_exact_sampler_temperature_one_and_errors():
    sampler = toy_sampler(1)
    assert_matches([exact_temperature_sample(sampler, 1.0) for _ in range(3000)], P)
    with pytest.raises(ValueError, match="temperature"):
        exact_temperature_sample(sampler, 1.5)
    with pytest.raises(RuntimeError, match="max_draws"):
        exact_temperature_sample(lambda: random.random(), 0.5, max_draws=100)  # never two equal draws


# --------------------------------------------------------------------------------------------
# Batch approximation
# --------------------------------------------------------------------------------------------
def batch_choice_distribution(p, num_candidates, n):
    """Exact law of batch_temperature_sample over N i.i.d. candidates, by enumerating count vectors."""
    out = [0.0] * len(p)
    for counts in itertools.product(range(num_candidates + 1), repeat=len(p)):
        if sum(counts) != num_candidates:
            continue
        prob = math.factorial(num_candidates)
        for c, q in zip(counts, p):
            prob *= q ** c / math.factorial(c)
        for m in range(n, 0, -1):
            w = [math.comb(c, m) for c in counts]
            if sum(w):
                for i, wi in enumerate(w):
                    out[i] += prob * wi / sum(w)
                break
    return out


def tv(a, b):
    return 0.5 * sum(abs(x - y) for x, y in zip(a, b))


@pytest.mark.parametrize("n", [2, 3])
def test_batch_sampler_matches_its_exact_law(n):
    num_candidates, draws = 6, 20000
    exact = batch_choice_distribution(P, num_candidates, n)
    r, g = random.Random(n), torch.Generator().manual_seed(n)
    samples = [batch_temperature_sample(r.choices(OUTCOMES, weights=P, k=num_candidates), n, g)
               for _ in range(draws)]
    assert_matches(samples, exact)
    # Mass moves towards the mode, part of the way to P^n / Z.
    target = tempered(P, n)
    assert P[0] < exact[0] < target[0]
    assert tv(exact, target) < tv(P, target)


def test_batch_sampler_limits():
    # T = 1 (n = 1): choosing ∝ count is exactly one plain sample.
    assert batch_choice_distribution(P, 6, 1) == pytest.approx(P, abs=1e-12)
    # Many candidates: close to P^n / Z (C(count, n) ≈ (N·p)^n / n!).
    r, g = random.Random(0), torch.Generator().manual_seed(0)
    samples = [batch_temperature_sample(r.choices(OUTCOMES, weights=P, k=200), 2, g) for _ in range(4000)]
    counts = Counter(samples)
    assert tv([counts[o] / 4000 for o in OUTCOMES], tempered(P, 2)) < 0.04
    # Falls back to lower m when no outcome repeats; never picks an unseen outcome.
    assert batch_temperature_sample(["x", "y", "z"], 3, g) in {"x", "y", "z"}
    assert batch_temperature_sample(["x", "y", "y"], 2, g) == "y"


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------

class LogitAE:
    """decode(z) = z read as K rows of logits (latent_dim = K·V), so tokens follow the head's output."""

    def __init__(self, k, v):
        self.k, self.v = k, v

    def decode(self, z):
        return z.reshape(*z.shape[:-2], z.shape[-2] * self.k, self.v)


def _random_head(calm, std):
    nn.init.normal_(calm.head.final_layer.linears[2].weight, std=std)  # the zero-init head is constant
    return calm


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_calm_generation_cache_matches_no_cache(temperature):
    calm = _random_head(tiny_model("calm"), 0.5)
    ae = tiny_model("ae")
    prompt = torch.randint(3, 4096, (2, 6), generator=torch.Generator().manual_seed(0))  # 6 → padded to 8
    kwargs = dict(max_new_tokens=16, temperature=temperature, num_candidates=16, eos_id=-1)
    a = generate_calm(calm, ae, prompt, use_cache=True, generator=torch.Generator().manual_seed(1), **kwargs)
    b = generate_calm(calm, ae, prompt, use_cache=False, generator=torch.Generator().manual_seed(1), **kwargs)
    for x, y, p in zip(a, b, prompt):
        assert torch.equal(x, y)
        assert torch.equal(x[:6], p)
        assert len(x) <= 6 + 16
    assert len(set(a[0][6:].tolist())) > 1  # non-trivial samples


def test_transformer_generation_cache_matches_no_cache():
    model = tiny_model("transformer")
    prompt = torch.randint(3, 4096, (2, 5), generator=torch.Generator().manual_seed(0))
    for temperature in (0.0, 0.8):
        a, b = [generate_transformer(model, prompt, 20, temperature, eos_id=-1, use_cache=c,
                                     generator=torch.Generator().manual_seed(2)) for c in (True, False)]
        for x, y in zip(a, b):
            assert torch.equal(x, y) and len(x) == 25


def _check_stopped(out, prompt, eos, pad, max_len):
    assert torch.equal(out[: len(prompt)], prompt)
    assert pad not in out.tolist()
    assert len(out) <= max_len
    new = out[len(prompt):].tolist()
    if eos in new:
        assert new.index(eos) == len(new) - 1  # nothing after the first EOS


def test_calm_generation_stops_at_eos_and_strips_pads():
    v, k = 8, 4  # latent_dim 32 = K·V: the head's latent is read directly as logits
    calm = _random_head(tiny_model("calm", f"model.vocab_size={v}", f"model.latent_dim={k * v}"), 3.0)
    ae = LogitAE(k, v)
    eos, pad = calm.config.eos_token_id, calm.config.pad_token_id
    prompt = torch.tensor([5, 3, 7, 4, 6])  # 1-D, not a multiple of K
    out = generate_calm(calm, ae, prompt, max_new_tokens=400, temperature=0.5, num_candidates=32,
                        generator=torch.Generator().manual_seed(0))
    assert out.dim() == 1
    _check_stopped(out, prompt, eos, pad, 5 + 400)
    assert out[-1].item() == eos, "with V=8 an EOS is all but certain within 100 chunks"
    # Without EOS stopping the same run keeps going: the stop really came from EOS.
    longer = generate_calm(calm, ae, prompt, max_new_tokens=400, temperature=0.5, num_candidates=32,
                           eos_id=-1, generator=torch.Generator().manual_seed(0))
    assert len(longer) > len(out)
    # A batch: every row stops on its own.
    prompts = torch.tensor([[5, 3, 7, 4, 6], [4, 4, 5, 6, 7], [7, 6, 5, 4, 3]])
    outs = generate_calm(calm, ae, prompts, max_new_tokens=400, temperature=1.0,
                         generator=torch.Generator().manual_seed(1))
    for o, p in zip(outs, prompts):
        _check_stopped(o, p, eos, pad, 5 + 400)


def test_transformer_generation_stops_at_eos_and_strips_pads():
    v = 8
    model = tiny_model("transformer", f"model.vocab_size={v}")
    nn.init.zeros_(model.lm_head.weight)  # uniform next token: EOS (and PAD) come up often
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    prompts = torch.tensor([[5, 3, 7], [4, 4, 5], [7, 6, 5]])
    outs = generate_transformer(model, prompts, 200, 1.0, generator=torch.Generator().manual_seed(0))
    for o, p in zip(outs, prompts):
        _check_stopped(o, p, eos, pad, 3 + 200)
        assert o[-1].item() == eos
    single = generate_transformer(model, prompts[0], 200, 1.0, generator=torch.Generator().manual_seed(0))
    assert single.dim() == 1
