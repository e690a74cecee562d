"""The opt-in low-precision head of generation (calm_pretrain/head_precision.py) against the fp32 head."""
from __future__ import annotations


import pytest
import torch
from torch import nn

from calm_pretrain.head_precision import head_sampler
from calm_pretrain.sampling import generate_calm
from tests.helpers.models import tiny_model


@pytest.fixture
def calm():
    model = tiny_model("calm")
    nn.init.normal_(model.head.final_layer.linears[2].weight, std=0.3)
    return model


@torch.no_grad()
def test_bf16_head_draws_the_same_noise_and_stays_close(calm):
    h = torch.randn(3, calm.config.hidden_size, generator=torch.Generator().manual_seed(1))
    g32, g16 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    want = calm.head.double()(h.double(), calm.head.draw_noise(h, 50, g32).double()).float()  # float64 head
    calm.head.float()
    got = head_sampler(calm.head, torch.bfloat16)(h, 50, generator=g16)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(g32.get_state(), g16.get_state())  # the same random numbers consumed
    err = (got - want).norm(dim=-1) / want.norm(dim=-1)
    assert 0 < err.max() < 0.05  # bf16 arithmetic: close, not equal
    assert head_sampler(calm.head, None) == calm.head.sample and head_sampler(calm.head, torch.float32) == calm.head.sample


@torch.no_grad()
def test_bf16_head_copy_follows_in_place_updates(calm):
    h = torch.randn(2, calm.config.hidden_size, generator=torch.Generator().manual_seed(1))
    before = head_sampler(calm.head, torch.bfloat16)(h, 4, generator=torch.Generator().manual_seed(0))
    calm.head.final_layer.linears[2].weight.mul_(-1)
    after = head_sampler(calm.head, torch.bfloat16)(h, 4, generator=torch.Generator().manual_seed(0))
    bias = calm.head.final_layer.linears[2].bias
    assert torch.allclose(after - bias, -(before - bias), rtol=0.05, atol=1e-2)


def test_generation_with_a_bf16_head(calm):
    ae = tiny_model("ae")
    prompt = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=16, temperature=0.5, num_candidates=16, eos_id=-1)
    a = generate_calm(calm, ae, prompt, generator=torch.Generator().manual_seed(3), head_dtype=torch.bfloat16, **kw)
    b = generate_calm(calm, ae, prompt, generator=torch.Generator().manual_seed(3), head_dtype=torch.bfloat16, **kw)
    assert all(torch.equal(x, y) and len(x) == 22 for x, y in zip(a, b))  # a seed still fixes the tokens
    with pytest.raises(ValueError, match="energy head"):
        head_sampler(tiny_model("calm", "model.head.type=mse").head, torch.bfloat16)
