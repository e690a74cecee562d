"""fp32 linears over many rows through MKL's packed GEMM (the energy head's samples at T < 1).

At T < 1 the batch sampler runs the energy head on N = 200 samples per chunk, and on the CPU those
fp32 GEMMs are the largest part of a step (docs/performance.md, 'Generation'). MKL can pack a weight
once into its kernel's own layout for a given number of rows (``cblas_sgemm_pack``, what PyTorch's
Inductor uses for frozen CPU linears); each later GEMM with that weight and that row count skips the
per-call repacking. Measured at 200 rows, 1 thread: 10-17% off each GEMM with a weight of 2^18 to
2^21 elements, and a column slice of a weight (the head's first linear reads its two halves that
way) is packed contiguous once instead of read strided on every call. A pack costs about one GEMM
and serves only its own row count (MKL computes any other count unpacked), so a (weight, row count)
pair is packed at its second use: the head sees the same row count at every step.

It is fp32 arithmetic with fp32 accumulation; only the order of the additions inside a dot product
differs from ``F.linear``'s kernel (≈1e-7 relative on the head's samples), as it also does between
thread counts or MKL versions. A sampled chunk can therefore change only where two outcomes are
within that rounding of each other (measured: ``tools/bench_generate.py --unpacked``,
``unpacked_agreement``).

Use: ``mode = PackedLinearMode()`` once, then ``with mode: ...`` around each call. Inside, every
``F.linear`` (``nn.Linear`` included) with an fp32 CPU input of at least ``min_rows`` rows, no
autograd, and a weight of at least ``min_weight`` elements goes through the packed kernel from its
second call with that row count on; everything else is untouched. The mode holds its packs between
entries. It holds only weak references to the weights: a weight changed in place (a new version) is
packed again, and the packs of a weight that no longer exists are dropped.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

MIN_ROWS = 32  # below this the GEMM reads the weight about once either way: packing saves little
# 512 × 512 (the published AE's width). Measured, 200 rows, 1 thread: packing takes 10-17% off a GEMM
# with a weight of 2^18 to 2^21 elements, 4-12% below, where the GEMM itself takes under 0.5 ms.
MIN_WEIGHT = 1 << 18
ROW_COUNTS_KEPT = 2  # per weight: one generation's batch and the previous one's


def available() -> bool:
    """Whether this PyTorch has MKL's packed linear (x86 CPU builds)."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class _WeightPacks:
    """The packs of one weight (a tensor or a view of one), per row count (None: seen once)."""

    __slots__ = ("owner", "version", "by_rows")

    def __init__(self, owner: torch.Tensor, version: int):
        self.owner, self.version = weakref.ref(owner), version
        self.by_rows: dict[int, Optional[torch.Tensor]] = {}


class PackedLinearMode(TorchFunctionMode):
    """Routes eligible ``F.linear`` calls to ``torch.ops.mkl._mkl_linear`` with a packed weight."""

    def __init__(self, min_rows: int = MIN_ROWS, min_weight: int = MIN_WEIGHT):
        super().__init__()
        self.min_rows, self.min_weight = min_rows, min_weight
        self.weights: dict[tuple, _WeightPacks] = {}  # (storage address, offset, shape, strides) → packs

    def eligible(self, x: torch.Tensor, w: torch.Tensor, b) -> bool:
        return (x.dtype == w.dtype == torch.float32 and x.device.type == "cpu" and w.device.type == "cpu"
                and w.dim() == 2 and w.numel() >= self.min_weight and x.dim() >= 2
                and x.numel() // max(x.shape[-1], 1) >= self.min_rows
                and (b is None or (b.dtype == torch.float32 and b.dim() == 1))
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))

    def pack(self, w: torch.Tensor, rows: int) -> Optional[torch.Tensor]:
        """The pack of w for ``rows`` rows, made at the pair's second use (None before)."""
        owner = w if w._base is None else w._base
        key = (w.untyped_storage().data_ptr(), w.storage_offset(), tuple(w.shape), w.stride())
        packs = self.weights.get(key)
        if packs is None or packs.owner() is not owner or packs.version != w._version:
            self.weights = {k: p for k, p in self.weights.items() if p.owner() is not None}  # weights gone
            packs = self.weights[key] = _WeightPacks(owner, w._version)
        if rows not in packs.by_rows:
            if len(packs.by_rows) >= ROW_COUNTS_KEPT:
                del packs.by_rows[next(iter(packs.by_rows))]  # the oldest row count
            packs.by_rows[rows] = None
            return None
        if packs.by_rows[rows] is None:
            packs.by_rows[rows] = torch.ops.mkl._mkl_reorder_linear_weight(w.contiguous(), rows)
        return packs.by_rows[rows]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if self.eligible(x, w, b):
                rows = x.reshape(-1, x.shape[-1])
                packed = self.pack(w, rows.shape[0])
                if packed is not None:
                    # The op reads the weight's shape from its unpacked form; the pack holds the values.
                    out = torch.ops.mkl._mkl_linear(rows.contiguous(), packed, w, b, rows.shape[0])
                    return out.reshape(*x.shape[:-1], w.shape[0])
        return func(*args, **kwargs)
