"""argmax over the vocabulary of ``x @ W.T`` without a full-precision pass over W (generation).

The AE decoder's output projection is the largest matrix a CALM reads per generated chunk (V × H:
128257 × 512 for the published AE). Only the argmax of its logits is used, so it is screened in
bfloat16 and verified in full precision:

1. s = bf16(x) · bf16(W)ᵀ — half the bytes of W, and the CPU's AMX / the GPU's tensor cores (on the
   CPU in blocks of the vocabulary, each reduced while it is in cache: :func:`_screen`).
2. Every exact logit l_v = x · w_v lies within ε = C · ‖x‖ · max_v ‖w_v‖ of s_v, with C = 2⁻⁶ above
   the rounding of both operands to bf16 (2·2⁻⁸ + 2⁻¹⁶ relative to Σ|x_i w_iv| ≤ ‖x‖‖w_v‖, Cauchy–
   Schwarz), of the bf16 output (2⁻⁸), and of fp32 accumulation (H·2⁻²⁴: 2.4·10⁻⁴ at H = 4096)
   together (≈ 0.012; C covers H up to about 60,000). Off the CPU, C is doubled: a GPU GEMM may
   round split-K partial sums to bf16 too.
   So the true argmax is among {v : s_v ≥ max(s) − 2ε}.
3. Those few logits are recomputed in the weight's own precision, and their argmax is returned.

The result is the argmax of the full-precision logits up to the rounding of the dot products
themselves (two orders of summation can differ in the last bit, which matters only for exact
ties). A bf16 (or fp16) weight has nothing to screen, a small one (under ``MIN_SCREENED``
elements) is not worth it, nor is a CPU without fast bf16 GEMMs: their logits are computed directly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SCREEN_TOLERANCE = 2.0 ** -6  # C above
MIN_SCREENED = 1 << 22  # a smaller weight (16 MiB in fp32) is read faster than screening costs


class ScreenedArgmax:
    """Holds the bf16 copy of one weight [V, H] and its largest row norm; rebuilt when the weight
    changes (another tensor, device, or an in-place update: ``_version``)."""

    def __init__(self):
        self._key = None
        self._low = self._max_norm = None

    def _prepare(self, weight: torch.Tensor):
        key = (weight.data_ptr(), weight.device, weight.dtype, weight._version)
        if key != self._key:
            w = weight.detach()
            self._low = w.to(torch.bfloat16)
            self._max_norm = w.float().norm(dim=-1).max()
            self._key = key
        return self._low, self._max_norm

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [..., H] → argmax_v (x · w_v) [...] (long)."""
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        if not _worth_screening(weight) or x.shape[0] == 0:
            return F.linear(x.to(weight.dtype), weight).argmax(-1).reshape(lead)
        low, max_norm = self._prepare(weight)
        tol = SCREEN_TOLERANCE * (1 if x.device.type == "cpu" else 2)
        eps2 = 2 * tol * x.float().norm(dim=-1) * max_norm  # [M]: the window below the top
        rows, cols = _screen(low, x, eps2)
        exact = (x[rows].to(weight.dtype) * weight[cols]).sum(-1)  # the few candidates, full precision
        best = torch.full((x.shape[0],), float("-inf"), dtype=exact.dtype, device=x.device)
        best = best.scatter_reduce(0, rows, exact, "amax")
        winner = torch.where(exact == best[rows], cols, torch.full_like(cols, weight.shape[0]))
        first = torch.full((x.shape[0],), weight.shape[0], dtype=cols.dtype, device=x.device)
        return first.scatter_reduce(0, rows, winner, "amin").reshape(lead)  # lowest index on a tie, as argmax


def _worth_screening(weight: torch.Tensor) -> bool:
    """An fp32/fp64 weight of at least MIN_SCREENED elements, on a device with fast bf16 GEMMs (on the
    CPU: oneDNN's bf16 support, AVX512-BF16 or AMX; without it bf16 is emulated and slower)."""
    if weight.dtype not in (torch.float32, torch.float64) or weight.numel() < MIN_SCREENED:
        return False
    return weight.device.type != "cpu" or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _bf16_below(t: torch.Tensor) -> torch.Tensor:
    """t (fp32) rounded to bf16 without exceeding it (bf16 rounds to nearest, within 2⁻⁸ relative)."""
    return (t - t.abs() * 2.0 ** -7).to(torch.bfloat16)


def _screen(low: torch.Tensor, x: torch.Tensor, eps2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of every (x row, vocabulary entry) whose bf16 logit is within eps2 of its row's top.

    On the CPU the vocabulary goes in blocks of about 2¹⁹ logits (in cache while they are read): each
    block keeps what is within eps2 of the running top, a cut below the final one, so nothing is lost,
    and the survivors are cut again at the end. Elsewhere, one block."""
    m, v = x.shape[0], low.shape[0]
    block = max(1024, (1 << 19) // m) if x.device.type == "cpu" else v
    xt = x.to(torch.bfloat16).t()
    top = torch.full((m,), float("-inf"), device=x.device)
    found = []
    for start in range(0, v, block):
        s = torch.mm(low[start:start + block], xt)  # [block, M] (W · xᵀ: the faster GEMM layout for few rows)
        top = torch.maximum(top, s.amax(0).float())
        cols, rows = (s >= _bf16_below(top - eps2)[None, :]).nonzero(as_tuple=True)
        found.append((rows, cols + start, s[cols, rows]))
    rows, cols, vals = (torch.cat(parts) for parts in zip(*found))
    keep = vals >= _bf16_below(top - eps2)[rows]
    return rows[keep], cols[keep]
