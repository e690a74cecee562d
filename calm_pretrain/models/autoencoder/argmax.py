"""argmax over the vocabulary of ``x @ W.T`` without a full-precision pass over W (generation).

The AE decoder's output projection is the largest matrix a CALM reads per generated chunk (V × H:
128257 × 512 for the published AE). Only the argmax of its logits is used, so it is screened in
bfloat16 and verified in full precision:

1. s = bf16(x) · bf16(W)ᵀ — half the bytes of W, and the CPU's AMX / the GPU's tensor cores.
2. A bound L (per row of x) on |a_v − x · w_v|, where a_v is the GEMM's fp32 accumulator before its
   output is rounded to bf16 (:func:`_slack`): the rounding of the operands, measured rather than
   bounded (‖x − bf16(x)‖ · max_v ‖w_v‖ + ‖bf16(x)‖ · max_v ‖w_v − bf16(w_v)‖, Cauchy–Schwarz), and
   of fp32 accumulation (H·2⁻²⁴ relative to ‖x‖‖w_v‖), with as much again for the fp32 recomputation
   in step 4 (so that the set holds the argmax of the recomputed logits too, not only the exact one).
   Off the CPU a GEMM may round split-K partial sums to bf16: 2⁻⁶‖x‖ max‖w_v‖ more.
3. The output's rounding to bf16 is monotone and within 2⁻⁷ relative (round-to-nearest is within
   2⁻⁸; 2⁻⁷ also covers truncation). The top t = max s has a_t ≥ t − 2⁻⁷|t|, the true argmax v*
   has a_{v*} ≥ a_t − 2L, so s_{v*} ≥ T := y − 2⁻⁷|y| with y = t − 2⁻⁷|t| − 2L
   (:func:`_thresholds`). The candidates are {v : s_v ≥ T}: ≈ 2-3 of 128257 with random weights
   (a window of ≈ 0.2 standard deviations of the logits; a bound of 2⁻⁵‖x‖ max‖w_v‖ held ≈ 25).
4. Those few logits are recomputed in the weight's own precision, and their argmax is returned.

The screen's cost beyond the GEMM is what it does with 200 × 128257 bf16 logits (:func:`_screen`):
a first pass keeps only the maximum of each sub-block of SUB_BLOCK vocabulary rows per x row, read
as int16 (the bits of a positive bf16 are ordered as the numbers, and an int16 reduction is an
order of magnitude faster on the CPU than a bf16 one); a second pass reads only the sub-blocks
whose maximum reaches the row's threshold. A row whose threshold is not positive (its logits may
all be negative) is compared as floats over its whole column instead.

The result is the argmax of the full-precision logits up to the rounding of the dot products
themselves (two orders of summation can differ in the last bit, which matters only for exact
ties). A bf16 (or fp16) weight has nothing to screen, a small one (under ``MIN_SCREENED``
elements) is not worth it, nor is a CPU without fast bf16 GEMMs: their logits are computed directly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_SCREENED = 1 << 22  # a smaller weight (16 MiB in fp32) is read faster than screening costs
SCREEN_BLOCK = 1 << 21  # logits per GEMM call of the screen on the CPU
GEMM_ROWS = 32  # x rows are padded to a multiple (above it): oneDNN's bf16 GEMM is faster for 224 rows than for 203
SUB_BLOCK = 64  # vocabulary rows per sub-block: what the second pass reads for a row that may win there
OUTPUT_ROUNDING = 2.0 ** -7  # relative error of the GEMM's bf16 output (step 3)
ACCUMULATION = 2.0 ** -24  # fp32 unit roundoff; × H per dot product (step 2)
SPLIT_K_ROUNDING = 2.0 ** -6  # off the CPU (step 2)


class ScreenedArgmax:
    """Holds the bf16 copy of one weight [V, H] (zero rows appended up to a multiple of SUB_BLOCK), its
    largest row norm and largest bf16 rounding error norm, and the logits buffer the screen writes
    (kept, so that its pages are not faulted in again on every call); rebuilt when the weight changes
    (another tensor, device, or an in-place update: ``_version``)."""

    def __init__(self):
        self._key = None
        self._low = self._max_norm = self._max_err = None
        self._buffer = torch.empty(0, dtype=torch.bfloat16)

    def _prepare(self, weight: torch.Tensor):
        key = (weight.data_ptr(), weight.device, weight.dtype, weight._version)
        if key != self._key:
            w = weight.detach()
            low = w.to(torch.bfloat16)
            self._max_norm = w.float().norm(dim=-1).max()
            self._max_err = (w.float() - low.float()).norm(dim=-1).max()
            self._low = torch.cat([low, low.new_zeros(-len(low) % SUB_BLOCK, low.shape[1])])
            self._key = key
        return self._low, self._max_norm, self._max_err

    def _logits_buffer(self, shape: tuple[int, int], device) -> torch.Tensor:
        need = shape[0] * shape[1]
        if self._buffer.numel() < need or self._buffer.device != torch.device(device):
            self._buffer = torch.empty(need, dtype=torch.bfloat16, device=device)
        return self._buffer[:need].view(shape)

    @torch.no_grad()  # an argmax has no gradient, and the screen writes into a kept buffer
    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [..., H] → argmax_v (x · w_v) [...] (long)."""
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1]).to(weight.dtype)
        if not _worth_screening(weight) or x.shape[0] == 0:
            return F.linear(x, weight).argmax(-1).reshape(lead)
        low, max_norm, max_err = self._prepare(weight)
        xb = x.to(torch.bfloat16)
        slack = _slack(x, xb, max_norm, max_err)
        logits = self._logits_buffer((low.shape[0], _gemm_rows(x.shape[0])), x.device)
        rows, cols = _screen(low, xb, slack, weight.shape[0], logits)
        exact = (x[rows] * weight[cols]).sum(-1)  # the few candidates, full precision
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


def _gemm_rows(m: int) -> int:
    """The screen's GEMM rows for m rows of x: above GEMM_ROWS, the next multiple of it; 2 for 1 (a one-column
    GEMM takes a path 1.5x slower than two columns, which cost the same: both only read W)."""
    return -(-m // GEMM_ROWS) * GEMM_ROWS if m > GEMM_ROWS else max(m, 2)


def _slack(x: torch.Tensor, xb: torch.Tensor, max_norm: torch.Tensor, max_err: torch.Tensor) -> torch.Tensor:
    """L [M] of step 2: a bound on |a_v − x · w_v| (screen) plus one on the recomputed logit's error."""
    x_norm, xb_norm = x.float().norm(dim=-1), xb.float().norm(dim=-1)
    operands = (x.float() - xb.float()).norm(dim=-1) * max_norm + xb_norm * max_err  # exact differences
    # The screen's accumulation (‖bf16(w_v)‖ ≤ (1 + 2⁻⁸)‖w_v‖) and the recomputation's, H + 2 roundings each.
    accumulation = (x.shape[-1] + 2) * ACCUMULATION * (xb_norm * (1 + 2.0 ** -8) + x_norm) * max_norm
    slack = operands + accumulation
    if x.device.type != "cpu":
        slack = slack + SPLIT_K_ROUNDING * xb_norm * max_norm * (1 + 2.0 ** -8)
    return slack * (1 + 2.0 ** -10)  # the norms' own rounding in fp32


def _bf16_below(t: torch.Tensor) -> torch.Tensor:
    """t (fp32) rounded to bf16 without exceeding it (bf16 rounds to nearest, within 2⁻⁸ relative)."""
    return (t - t.abs() * 2.0 ** -7).to(torch.bfloat16)


def _thresholds(top: torch.Tensor, slack: torch.Tensor) -> torch.Tensor:
    """T of step 3 as bf16 (rounded down): every logit that can be the argmax has s_v ≥ T."""
    y = top - OUTPUT_ROUNDING * top.abs() - 2 * slack
    return _bf16_below(y - OUTPUT_ROUNDING * y.abs())


def _screen(low: torch.Tensor, xb: torch.Tensor, slack: torch.Tensor, vocab: int,
            logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of every (x row, vocabulary entry) whose bf16 logit reaches its row's threshold.

    First pass: s = low · xbᵀ into ``logits`` [V', M'] (M' ≥ M: zero rows appended to x; on the CPU in
    blocks of SCREEN_BLOCK logits), keeping the maximum of each sub-block of each column as int16 bits
    (meaningful where positive) right after each block is written. Second pass: only the (sub-block,
    row) pairs that reach a positive threshold; rows without one are compared as floats
    (:func:`_float_rows`)."""
    m, v = xb.shape[0], low.shape[0]
    block = max(1, SCREEN_BLOCK // (m * SUB_BLOCK)) * SUB_BLOCK if xb.device.type == "cpu" else v
    xt = torch.cat([xb, xb.new_zeros(logits.shape[1] - m, xb.shape[1])]).t().contiguous()  # zero columns: not read
    bits = logits.view(torch.int16)
    width = logits.shape[1]
    sub_max = bits.new_empty(v // SUB_BLOCK, m)
    for start in range(0, v, block):
        torch.mm(low[start:start + block], xt, out=logits[start:start + block])  # W · xᵀ: faster for few rows
        part = bits[start:start + block, :m]
        sub_max[start // SUB_BLOCK:(start + len(part)) // SUB_BLOCK] = part.unflatten(0, (-1, SUB_BLOCK)).amax(1)
    top_bits = sub_max.amax(0)
    thr = _thresholds(top_bits.view(torch.bfloat16).float(), slack)
    thr_bits = thr.view(torch.int16)
    by_bits = (top_bits > 0) & (thr_bits > 0)  # +0 and every negative bf16 have bits ≤ 0
    sub, row = (sub_max >= thr_bits).logical_and_(by_bits).nonzero(as_tuple=True)
    offsets = torch.arange(SUB_BLOCK, device=xb.device)
    idx = sub[:, None] * SUB_BLOCK + offsets  # [P, SUB_BLOCK] vocabulary entries of each pair
    vals = bits.view(-1)[idx * width + row[:, None]]  # a flat gather: faster than indexing rows and columns
    p, j = (vals >= thr_bits[row][:, None]).nonzero(as_tuple=True)
    rows, cols = row[p], idx[p, j]
    if not by_bits.all():
        more = _float_rows(logits[:vocab], (~by_bits).nonzero().flatten(), slack)
        rows, cols = torch.cat([rows, more[0]]), torch.cat([cols, more[1]])
    return rows, cols


def _float_rows(logits: torch.Tensor, which: torch.Tensor, slack: torch.Tensor):
    """(rows, cols) of the screen for the rows ``which`` from their whole columns of bf16 logits, as floats."""
    col = logits[:, which].float()  # [V, R]
    thr = _thresholds(col.amax(0), slack[which]).float()
    cols, r = (col >= thr).nonzero(as_tuple=True)
    return which[r], cols
