"""What a training process prints beyond its own log lines: library warnings that say nothing is
wrong are filtered once per process, by message, so every other warning from those libraries shows.

* megatron-core: "Transformer Engine and Apex are not installed. Falling back to ..." — both are
  NVIDIA GPU libraries; the fallbacks are what this project uses (it takes only megatron-core's
  process groups and tensor-parallel layers; optimizers and fusions come from torch and DeepSpeed).
* torch: "`torch.distributed.all_gather_into_tensor` is deprecated" — raised inside DeepSpeed's own
  collectives, once per rank per process; nothing a user can change.
"""
from __future__ import annotations

import warnings

HARMLESS = [
    (UserWarning, r"Transformer Engine and Apex are not installed"),
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
]


def filter_harmless_warnings() -> None:
    for category, message in HARMLESS:
        warnings.filterwarnings("ignore", message=".*" + message, category=category)
