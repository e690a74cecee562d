"""No code runs from a checkpoint file: every ``torch.load`` of a file a run reads is restricted.

A ``.pt`` file is a pickle, and unpickling calls whatever the file names (``__reduce__``): a crafted
``mp_rank_00_model_states.pt`` runs its code on ``calm-pretrain export`` and, once per rank, on resume.
So every file is read with torch's weights-only unpickler (tensors, plain containers, numbers,
strings) plus an allow-list of exactly the other types our and DeepSpeed's checkpoints hold
(``CHECKPOINT_GLOBALS``, found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` over
checkpoints of ZeRO 0-3, tensor and pipeline parallelism and DeepSpeed's universal format). Anything
else is refused, never called, with an error naming the file and the refused global.

DeepSpeed calls ``torch.load(..., weights_only=False)`` itself (``engine.load_checkpoint``,
``ds_to_universal``, the universal loader); ``deepspeed_loads_safely()`` routes
those calls through :func:`safe_load` while it runs. DeepSpeed looks ``torch.load`` up on the module
at every call, so replacing the attribute reaches all of them; the conversion to the universal format
runs in this process (one extract and merge worker), so the replacement covers it too.
"""
from __future__ import annotations

import contextlib
import pickle
import re
from pathlib import Path

import torch

from calm_pretrain.errors import CheckpointError

_torch_load = torch.load  # the real one, whatever is patched later


def checkpoint_globals() -> list:
    """The non-plain types in checkpoints that DeepSpeed writes for our runs (its optimizer states)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler  # the static scaler of fp32/bf16 runs
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address  # ZeRO 1/2 parameter slice mappings

    return [LossScaler, ZeroStageEnum, fragment_address]


def _refused_global(e: Exception) -> str:
    """The informative part of torch's long weights-only message (which global was refused)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip().split(". ")[0]
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def safe_load(f, map_location="cpu", **kwargs):
    """``torch.load`` with weights_only=True and the checkpoint allow-list; a file that names any other
    global raises CheckpointError naming the file (the global is never called)."""
    kwargs.pop("weights_only", None)
    kwargs.pop("pickle_module", None)  # weights-only loading uses torch's own restricted unpickler
    with torch.serialization.safe_globals(checkpoint_globals()):
        try:
            return _torch_load(f, map_location=map_location, weights_only=True, **kwargs)
        except pickle.UnpicklingError as e:
            name = f if isinstance(f, (str, Path)) else getattr(f, "name", "a checkpoint file")
            raise CheckpointError(f"{name}: refusing to load it: it holds a pickled object that is not one of the "
                                  f"types a checkpoint contains ({_refused_global(e)}); nothing of it was "
                                  f"executed") from None


def _forced_safe_load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **kwargs):
    return safe_load(f, map_location=map_location, mmap=mmap, **kwargs)


@contextlib.contextmanager
def deepspeed_loads_safely():
    """Within this block every ``torch.load`` (DeepSpeed's included) is :func:`safe_load`."""
    previous = torch.load
    torch.load = _forced_safe_load
    try:
        yield
    finally:
        torch.load = previous
