"""How the energy head's samples are computed during generation (``head_sampler``).

* Default at T < 1: the head's own fp32 arithmetic with its GEMMs through MKL's packed kernel
  (calm_pretrain/packed_gemm.py; the packs kept per head between generations).
* Opt-in, not exact: a lower precision (``generate_calm(..., head_dtype=torch.bfloat16)``).

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
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from calm_pretrain import packed_gemm


@dataclass
class _LowCopy:
    key: tuple  # the head's weights (address, version) when copied
    dtype: torch.dtype
    head: torch.nn.Module


HEAD_DTYPES = {"bf16": torch.bfloat16}  # the opt-in precisions, by the name the CLI and the benchmark take

_COPIES: "weakref.WeakKeyDictionary[torch.nn.Module, _LowCopy]" = weakref.WeakKeyDictionary()
_PACKED: "weakref.WeakKeyDictionary[torch.nn.Module, packed_gemm.PackedLinearMode]" = weakref.WeakKeyDictionary()


def head_sampler(head, dtype: Optional[torch.dtype] = None, packed: bool = False) -> Callable:
    """A sampler with ``head.sample``'s signature and random numbers:

    * ``dtype`` other than the head's own: a ``dtype`` copy of the head runs (kept until a weight
      changes: another tensor or an in-place update), the noise drawn as ``head.sample`` draws it;
    * else with ``packed`` (a head on the CPU, not compiled, where MKL's packed GEMM exists):
      ``head.sample`` inside the head's :class:`~calm_pretrain.packed_gemm.PackedLinearMode`;
    * else ``head.sample`` itself."""
    first = next(head.parameters())
    own = first.dtype
    if dtype is None or dtype == own:
        # A compiled block (train.compile) is left to its compiled code: tracing the mode's bookkeeping
        # would recompile it at every new pack.
        compiled = any(getattr(m, "_compiled_call_impl", None) is not None for m in head.modules())
        if not (packed and first.device.type == "cpu" and not compiled and packed_gemm.available()):
            return head.sample
        mode = _PACKED.get(head)
        if mode is None:
            mode = _PACKED[head] = packed_gemm.PackedLinearMode()

        def sample_packed(h: torch.Tensor, num_samples: int = 1, generator: Optional[torch.Generator] = None):
            with mode:
                return head.sample(h, num_samples, generator=generator)

        return sample_packed
    if not hasattr(head, "draw_noise"):
        raise ValueError("head_dtype needs a head that draws its noise apart (the energy head), "
                         f"not {type(head).__name__}")
    key = tuple((p.data_ptr(), p._version) for p in head.parameters())
    entry = _COPIES.get(head)
    if entry is None or entry.key != key or entry.dtype != dtype:
        entry = _COPIES[head] = _LowCopy(key, dtype, copy.deepcopy(head).to(dtype))
    low = entry.head

    def sample(h: torch.Tensor, num_samples: int = 1, generator: Optional[torch.Generator] = None):
        noise = head.draw_noise(h, num_samples, generator)  # the fp32 path's random numbers
        return low(h.to(dtype), noise.to(dtype)).to(h.dtype)

    return sample
