"""The batched CALM generation path against independent computations: the one-row-at-a-time loop
with every candidate decoded in full (calm_pretrain/sampling_reference.py), full-precision argmax
decoding, and the full count of decoded candidates."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from calm_pretrain.candidates import Unique, candidate_keys, complete
from calm_pretrain.models.autoencoder.argmax import ScreenedArgmax
from calm_pretrain.sampling import batch_temperature_choice, generate_calm
from calm_pretrain.sampling_reference import reference_generate_calm
from tests.helpers.models import tiny_model


def _pair(vocab: int, head_std: float):
    """A tiny CALM with a non-constant head and a tiny AE, both over `vocab` tokens (a small vocabulary
    makes candidates agree on some positions and not on others)."""
    calm = tiny_model("calm", f"model.vocab_size={vocab}")
    nn.init.normal_(calm.head.final_layer.linears[2].weight, std=head_std)
    return calm, tiny_model("ae", f"model.vocab_size={vocab}")


def test_screened_argmax_matches_float64_argmax(monkeypatch):
    monkeypatch.setattr("calm_pretrain.models.autoencoder.argmax.MIN_SCREENED", 0)  # screen this small weight
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5000, 64, generator=g)
    w[1::2] = w[::2] * (1 + 1e-4 * torch.randn(2500, 64, generator=g))  # near-ties bf16 cannot separate
    x = torch.cat([torch.randn(180, 64, generator=g), w[:40:2] * 3])  # some rows aim at a near-tied pair
    screened = ScreenedArgmax()
    want = (x.double() @ w.double().T).argmax(-1)
    assert torch.equal(screened(x, w), want)  # 200 rows: the vocabulary in two blocks on the CPU
    assert torch.equal(screened(x[:40], w), want[:40])  # one block
    assert torch.equal(screened(x.reshape(4, 50, 64), w), want.reshape(4, 50))
    w.mul_(-1)  # an in-place update: the bf16 copy is rebuilt
    assert torch.equal(screened(x, w), (x.double() @ w.double().T).argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_screened_argmax_in_blocks_and_without_a_positive_threshold(monkeypatch, dtype):
    """Several GEMM blocks (a vocabulary that is no multiple of the sub-block), padded GEMM rows, and rows
    whose logits are all negative or whose top is too close to 0 for the int16 comparison."""
    monkeypatch.setattr("calm_pretrain.models.autoencoder.argmax.MIN_SCREENED", 0)
    monkeypatch.setattr("calm_pretrain.models.autoencoder.argmax.SCREEN_BLOCK", 1 << 14)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(3001, 48, generator=g, dtype=torch.float64)
    w[:, 0] = 4 + w[:, 0].abs()  # every row leans the same way
    w[1::3] = w[::3][: len(w[1::3])] * (1 - 3e-4 * torch.rand(1000, 1, generator=g, dtype=torch.float64))
    x = torch.randn(70, 48, generator=g, dtype=torch.float64)
    x[:20, 0] = -40  # all logits negative
    x[20:30, 0] = 0.0  # logits around 0
    for row in x[40:45]:  # a positive top below the bf16 error: x₀ bisected to a max logit of ≈ 1e-4
        lo, hi = -20.0, 20.0  # the max logit grows with x₀ (every w₀ > 0)
        for _ in range(60):
            row[0] = (lo + hi) / 2
            lo, hi = (lo, row[0].item()) if (w @ row).max() > 1e-4 else (row[0].item(), hi)
    x[30:40] = w[:30:3] * 2  # aimed at a near-tied pair
    w, x = w.to(dtype), x.to(dtype)
    assert (x[:20].double() @ w.double().T).max() < 0 < (x[40:45].double() @ w.double().T).amax(-1).min()
    screened = ScreenedArgmax()
    _assert_argmax(screened(x, w), x, w)
    _assert_argmax(screened(x[:7], w), x[:7], w)  # fewer rows than GEMM_ROWS: not padded
    _assert_argmax(screened(x[20:], w), x[20:], w)


def _assert_argmax(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor):
    """got is the float64 argmax of x · wᵀ, except where x's own precision cannot tell the top two apart
    (logits that cancel to near 0 in fp32): there it is within the fp32 rounding of a dot product."""
    logits = (x.double() @ w.double().T)
    top2 = logits.topk(2, -1).values
    tol = 0.0 if x.dtype == torch.float64 else 2 * (x.shape[-1] + 2) * 2.0 ** -24 * (
        x.double().norm(dim=-1) * w.double().norm(dim=-1).max())
    clear = top2[:, 0] - top2[:, 1] > tol
    assert torch.equal(got[clear], logits.argmax(-1)[clear])
    assert (logits.gather(-1, got[:, None])[:, 0] >= top2[:, 0] - tol).all()
    assert clear.float().mean() > 0.9


@pytest.mark.parametrize("screen_from", [0, 1 << 40])
def test_decode_tokens_is_argmax_of_decode(monkeypatch, screen_from):
    monkeypatch.setattr("calm_pretrain.models.autoencoder.argmax.MIN_SCREENED", screen_from)
    ae = tiny_model("ae")
    z = torch.randn(3, 7, 2, ae.config.latent_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ae.decode_tokens(z), ae.decode(z).double().argmax(-1))


@pytest.mark.parametrize("few_rows", [0, 32, 1 << 20])  # never / at most 32 rows / always decoded to the end
@pytest.mark.parametrize("vocab,head_std", [(16, 0.0), (4, 0.3), (4, 3.0), (16, 0.3)])
def test_candidate_keys_choose_what_the_full_count_chooses(monkeypatch, vocab, head_std, few_rows):
    monkeypatch.setattr("calm_pretrain.models.autoencoder.argmax.MIN_SCREENED", 0)
    monkeypatch.setattr("calm_pretrain.candidates.FEW_ROWS", few_rows)
    calm, ae = _pair(vocab, head_std)
    g = torch.Generator().manual_seed(2)
    h = torch.randn(3, calm.config.hidden_size, generator=g)
    decoded_rows = []
    token_argmax = ae.token_argmax
    monkeypatch.setattr(ae, "token_argmax", lambda x: decoded_rows.append(len(x)) or token_argmax(x))
    with torch.no_grad():
        z = calm.head.sample(h, 40, generator=g)
        full = [[tuple(c) for c in row] for row in ae.decode(z.unsqueeze(-2)).argmax(-1).tolist()]
        keys, state = candidate_keys(ae, z, ahead=[0, 17, 39])
    if head_std == 0:  # a constant head: 40 identical latents per row, each row's one latent decoded once,
        assert decoded_rows == [3 * 4]  # all K positions in the first pass (it is the one decoded ahead)
    assert len(decoded_rows) <= (2 if few_rows > 1000 else 4)  # position 0, then the rest at once
    for row_keys, c in zip(keys, [0, 17, 39]):
        assert len(row_keys[c].prefix if isinstance(row_keys[c], Unique) else row_keys[c]) == 4  # all K known
    for row_full, row_keys in zip(full, keys):
        counts = Counter(row_full)
        for f, key in zip(row_full, row_keys):
            if isinstance(key, Unique):
                assert counts[f] == 1 and f[: len(key.prefix)] == key.prefix
            else:
                assert key == f and counts[f] >= 2
    if vocab == 4:  # both kinds of key occur (a zero head: every candidate decodes alike)
        assert {isinstance(key, Unique) for row in keys for key in row} == {True, False}
    for n in (2, 3):
        for u in torch.rand(50, generator=g, dtype=torch.float64).tolist():
            picks = [(i, batch_temperature_choice(row, n, u)) for i, row in enumerate(keys)]
            assert complete(ae, state, picks) == [batch_temperature_choice(row, n, u) for row in full]


@pytest.mark.parametrize("temperature", [1.0, 0.5, 1 / 3])
@pytest.mark.parametrize("vocab,head_std", [(4, 0.3), (16, 0.3), (16, 0.0), (4096, 0.5)])
def test_generation_matches_the_reference_loop(monkeypatch, temperature, vocab, head_std):
    monkeypatch.setattr("calm_pretrain.models.autoencoder.argmax.MIN_SCREENED", 0)  # the screened decoding
    calm, ae = _pair(vocab, head_std)
    prompts = torch.randint(3, vocab, (3, 6), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=24, temperature=temperature, num_candidates=24, eos_id=-1)
    got = generate_calm(calm, ae, prompts, generator=torch.Generator().manual_seed(3), **kw)
    want = reference_generate_calm(calm, ae, prompts, generator=torch.Generator().manual_seed(3), **kw)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    if head_std:
        assert len(set(got[0][6:].tolist())) > 1  # non-trivial samples


def test_generation_with_eos_matches_the_reference_loop(monkeypatch):
    monkeypatch.setattr("calm_pretrain.models.autoencoder.argmax.MIN_SCREENED", 0)
    calm, ae = _pair(16, 0.3)  # EOS (id 2) is one of 16 tokens: rows stop early
    for seed in range(3):
        for temperature in (1.0, 0.5):
            prompt = torch.tensor([5, 3, 7, 4, 6])
            kw = dict(max_new_tokens=200, temperature=temperature, num_candidates=16)
            got = generate_calm(calm, ae, prompt, generator=torch.Generator().manual_seed(seed), **kw)
            want = reference_generate_calm(calm, ae, prompt, generator=torch.Generator().manual_seed(seed), **kw)
            assert torch.equal(got, want)


@pytest.mark.parametrize("temperature", [0.5])
def test_exact_sampler_matches_the_reference_loop(monkeypatch, temperature):
    monkeypatch.setattr("calm_pretrain.models.autoencoder.argmax.MIN_SCREENED", 0)
    calm, ae = _pair(4, 0.05)  # 4 tokens and a narrow head: draws agree often enough to accept soon
    prompts = torch.randint(3, 4, (2, 4), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=8, temperature=temperature, sampler="exact", eos_id=-1)
    got = generate_calm(calm, ae, prompts, generator=torch.Generator().manual_seed(4), **kw)
    want = reference_generate_calm(calm, ae, prompts, generator=torch.Generator().manual_seed(4), **kw)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_generation_builds_no_autograd_graph(monkeypatch):
    """generate_calm called with autograd on (as `calm-pretrain generate` calls it) records no graph."""
    calm, ae = _pair(64, 0.3)
    seen = []
    sample = calm.head.sample
    monkeypatch.setattr(calm.head, "sample", lambda *a, **kw: seen.append(torch.is_grad_enabled()) or sample(*a, **kw))
    assert torch.is_grad_enabled()
    for temperature in (1.0, 0.5):
        generate_calm(calm, ae, torch.tensor([5, 6, 7, 8]), 8, temperature=temperature, num_candidates=8, eos_id=-1)
    assert seen and not any(seen)
