"""The CPU shims megatron-core 0.16.1 needs, all in one place; applied only when CUDA is unavailable.

This project uses a small part of megatron-core: ``parallel_state`` (process groups), the
tensor-parallel layers (column/row-parallel linears, vocab-parallel embedding, the mappings that
all-reduce/all-gather between them) and the model-parallel RNG tracker. On a machine without CUDA
(CI on gloo) these reach the CUDA runtime in three ways, each replaced here:

* ``torch.cuda.current_device()`` names the device of new buffers (all-gather outputs in
  ``tensor_parallel.mappings``, weights when ``use_cpu_initialization`` is off). On CPU it returns
  ``torch.device("cpu")``, which every torch factory accepts as ``device=`` — no global
  TorchFunctionMode is needed to rewrite "cuda" arguments (one would be, to also run megatron's DDP,
  distributed optimizer and checkpointing on CPU, which this project leaves to DeepSpeed).
* ``torch.cuda.synchronize()`` after collectives (e.g. ``update_pg_timeout``): a no-op on CPU.
* The "CUDA" RNG state behind ``tensor_parallel.random`` (``CudaRNGStatesTracker.add/fork``,
  ``model_parallel_cuda_manual_seed``): ``torch.cuda.get_rng_state/set_rng_state/manual_seed`` and
  megatron's ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` read and write the global CPU generator
  instead, so ``fork()`` keeps its semantics (draws inside the fork come from the named stream, the
  default stream is restored afterwards). ``torch.cuda.manual_seed_all`` (called by ``torch.manual_seed``)
  is left alone, so ordinary seeding is unchanged.

``apply()`` is idempotent and does nothing when CUDA is available.
"""
from __future__ import annotations

import torch

_applied = False


def _cpu_get_rng_state(device=None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()  # a copy already


def _cpu_set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def apply() -> bool:
    """Install the shims (once). Returns True when the CPU path is active."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    # CudaRNGStatesTracker.add and model_parallel_cuda_manual_seed call these directly (on a CPU-only
    # build they would queue lazy calls that never run, and the tracked states would all be equal).
    torch.cuda.get_rng_state = _cpu_get_rng_state
    torch.cuda.set_rng_state = _cpu_set_rng_state
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))

    from megatron.core.tensor_parallel import random as mcore_random

    # The tracker's methods look these module-level functions up at call time.
    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state
    _applied = True
    return True


def is_applied() -> bool:
    return _applied
