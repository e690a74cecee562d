"""Opt-in, not exact: the energy head's samples in a lower precision during generation
(``generate_calm(..., head_dtype=torch.bfloat16)``; off by default).

At T < 1 the batch sampler draws N = 200 head samples per chunk, and in fp32 their GEMMs are most of
a step on the CPU (docs/performance.md, 'Generation'). A bf16 copy of the head runs them on AMX
(CALM-M's head, 200 samples, 1 thread: 65 ms → 20 ms). The noise is still drawn in the head's own
dtype from the same generator, so the random numbers are those of the fp32 path; what changes is
the head's arithmetic, so samples move by about bf16's precision and some chunks differ (measured:
``tools/bench_generate.py --head-dtype bf16``).
"""
from __future__ import annotations

import copy
import weakref
from typing import Callable, Optional

import torch

_COPIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # head → (its weights' key, the copy)


def head_sampler(head, dtype: Optional[torch.dtype]) -> Callable:
    """``head.sample`` itself (dtype None or the head's own), else a sampler with the same signature that
    draws the noise as ``head.sample`` does and runs a ``dtype`` copy of the head (kept until a weight
    changes: another tensor or an in-place update)."""
    own = next(head.parameters()).dtype
    if dtype is None or dtype == own:
        return head.sample
    if not hasattr(head, "draw_noise"):
        raise ValueError("head_dtype needs a head that draws its noise apart (the energy head), "
                         f"not {type(head).__name__}")
    key = tuple((p.data_ptr(), p._version) for p in head.parameters())
    entry = _COPIES.get(head)
    if entry is None or entry[0] != key or entry[1][0] != dtype:
        entry = _COPIES[head] = (key, (dtype, copy.deepcopy(head).to(dtype)))
    low = entry[1][1]

    def sample(h: torch.Tensor, num_samples: int = 1, generator: Optional[torch.Generator] = None):
        noise = head.draw_noise(h, num_samples, generator)  # the fp32 path's random numbers
        return low(h.to(dtype), noise.to(dtype)).to(h.dtype)

    return sample
