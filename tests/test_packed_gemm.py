"""MKL's packed fp32 GEMM for generation (calm_pretrain/packed_gemm.py) against float64 and F.linear."""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from calm_pretrain import packed_gemm
from calm_pretrain.head_precision import head_sampler
from calm_pretrain.packed_gemm import PackedLinearMode
from calm_pretrain.sampling import generate_calm
from tests.helpers.models import tiny_model


def test_this_torch_has_the_packed_kernel():
    """The pinned torch (x86 CPU build) has MKL, and generation's default path uses it: a build without
    it fails here rather than skipping (tests/helpers/skip_policy.py: no silent skips)."""
    assert packed_gemm.available()


def _packs(mode: PackedLinearMode) -> int:
    return sum(pack is not None for w in mode.weights.values() for pack in w.by_rows.values())


def _close_to_float64(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b) -> None:
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    # fp32 accumulation over K terms: a few ulps of the sum of |terms| (not of the result)
    scale = F.linear(x.double().abs(), w.double().abs()) + (0 if b is None else b.double().abs())
    assert ((got.double() - want).abs() <= 1e-6 * scale + 1e-30).all()


@torch.no_grad()
def test_packed_linear_is_fp32_linear_from_the_second_call():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 1024, generator=g) * 0.03
    b = torch.randn(1024, generator=g)
    x = torch.randn(2, 100, 512, generator=g)  # 3-D input: 200 rows
    half = w[:, :512]  # a column slice, as the energy head reads its first linear
    mode = PackedLinearMode()
    with mode:
        first = F.linear(x, half, b)
        assert _packs(mode) == 0 and torch.equal(first, F.linear(x, half.contiguous(), b))  # plain at first use
        second = F.linear(x, half, b)
        third = nn.functional.linear(x, half, b)
    assert _packs(mode) == 1 and second.shape == (2, 100, 1024)
    assert torch.equal(second, third)
    _close_to_float64(second, x, half, b)
    with mode:  # the packs persist from one entry to the next
        F.linear(x[:, :50], half)  # another row count: its own pack, at its own second use
        F.linear(x[:, :50], half)
    assert _packs(mode) == 2


@torch.no_grad()
def test_ineligible_linears_are_untouched():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1024, 512, generator=g)
    cases = [
        (torch.randn(8, 512, generator=g), w),  # few rows
        (torch.randn(200, 64, generator=g), torch.randn(64, 64, generator=g)),  # a small weight
        (torch.randn(200, 512, generator=g).bfloat16(), w.bfloat16()),  # not fp32
        (torch.randn(200, 512, generator=g).double(), w.double()),
    ]
    mode = PackedLinearMode()
    with mode:
        for x, weight in cases:
            for _ in range(3):
                assert torch.equal(F.linear(x, weight), torch.mm(x, weight.t()))
    assert _packs(mode) == 0


def test_autograd_is_never_packed():
    w = nn.Parameter(torch.randn(1024, 512) * 0.03)
    x = torch.randn(200, 512)
    mode = PackedLinearMode()
    with mode:
        for _ in range(3):
            y = F.linear(x, w)
        y.square().sum().backward()
    assert _packs(mode) == 0 and w.grad is not None
    assert torch.allclose(w.grad, 2 * (x @ w.detach().t()).t() @ x, rtol=1e-4, atol=1e-3)


@torch.no_grad()
def test_a_weight_changed_in_place_is_packed_again():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(1024, 512, generator=g) * 0.03
    x = torch.randn(200, 512, generator=g)
    mode = PackedLinearMode()
    with mode:
        F.linear(x, w)
        before = F.linear(x, w)
        w.mul_(-2)
        F.linear(x, w)
        assert _packs(mode) == 0  # the old pack is dropped, the new version seen once
        after = F.linear(x, w)
    assert _packs(mode) == 1
    _close_to_float64(after, x, w, None)
    assert torch.allclose(after, -2 * before, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_packs_of_weights_that_are_gone_are_dropped():
    x = torch.randn(200, 512)
    mode = PackedLinearMode()
    with mode:
        for _ in range(3):
            w = torch.randn(1024, 512)  # a new weight each time, the old one freed
            F.linear(x, w)
            F.linear(x, w)
    assert len(mode.weights) == 1 and _packs(mode) == 1
    with mode:
        for rows in (200, 100, 50):  # row counts beyond the kept two: the oldest goes
            F.linear(x[:rows], w)
    assert sorted(mode.weights[next(iter(mode.weights))].by_rows) == [50, 100]


def test_generation_at_t_below_one_packs_the_head(monkeypatch):
    """A head wide enough to be packed (512): the packed GEMMs are used from the second step on (and in a
    later generation from the first), a seed fixes the tokens, and here they are the tokens of the
    unpacked path (no outcome within fp32 rounding of another; in general a near-tie may differ)."""
    made = []
    real = PackedLinearMode.pack

    def spy(self, w, rows):
        pack = real(self, w, rows)
        made.append(pack is not None)
        return pack

    monkeypatch.setattr(PackedLinearMode, "pack", spy)
    calm = tiny_model("calm", "model.hidden_size=512", "model.intermediate_size=1024", "model.num_heads=4",
                  "model.num_kv_heads=4")
    nn.init.normal_(calm.head.final_layer.linears[2].weight, std=0.3)
    ae = tiny_model("ae")
    prompt = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=16, temperature=0.5, num_candidates=64, eos_id=-1)
    packed = generate_calm(calm, ae, prompt, generator=torch.Generator().manual_seed(3), **kw)
    assert any(made) and not made[0]
    made.clear()
    again = generate_calm(calm, ae, prompt, generator=torch.Generator().manual_seed(3), **kw)
    plain = generate_calm(calm, ae, prompt, generator=torch.Generator().manual_seed(3), packed_gemm=False, **kw)
    assert all(torch.equal(a, b) and torch.equal(a, c) and len(a) == 22 for a, b, c in zip(packed, again, plain))
    assert made and all(made)  # the second generation found the first one's packs
    made.clear()
    generate_calm(calm, ae, prompt, generator=torch.Generator().manual_seed(3), **{**kw, "temperature": 1.0})
    assert not made  # T = 1: one row per prompt, nothing to pack


def test_a_compiled_or_gpu_head_is_not_packed():
    """Packing applies to an eager CPU head only: a compiled head keeps its compiled code (tracing the
    mode's bookkeeping would recompile it at each new pack), and a GPU head has no MKL."""
    calm = tiny_model("calm", "model.hidden_size=512", "model.intermediate_size=1024")
    assert head_sampler(calm.head, packed=True) != calm.head.sample  # eager CPU: packed
    assert head_sampler(calm.head, packed=False) == calm.head.sample
    calm.head.mlp_blocks[0].compile()  # what train.compile does to a block (nothing runs until a call)
    assert head_sampler(calm.head, packed=True) == calm.head.sample
