"""The one interface the training loop talks to, and the accumulation window the engines share.

An engine (:class:`calm_pretrain.parallel.engine.TorchEngine`, ``DeepSpeedEngine``,
:class:`calm_pretrain.parallel.pipeline.PipelineEngine`) is anything with:

  ``module``   the ``nn.Module`` it trains (a pipeline rank: the whole model, other stages on ``meta``);
  ``device``   where its micro-batches go;
  ``step(batches, lr, loss_fn) -> StepResult``  one whole accumulation window: pull
               ``train.grad_accum_steps`` micro-batches from ``batches``, forward, backward, clip and
               update, or drop the window without touching weights or optimizer state when the global
               gradient norm is not finite (``applied`` False, on every rank alike);
  ``save(path)`` / ``load(path, saved_layout)``  its share of a checkpoint;
  ``kind``     whose files ``save`` writes (``"torch"``: engine.pt; ``"deepspeed"``: DeepSpeed's own),
               recorded in every checkpoint: resume and consolidation read the record.

``loss_fn(forward, batch) -> (loss, extras)`` is the architecture's loss on one device batch
(``forward`` is the engine's forward). A pipeline ignores it: its last stage computes the loss.
Losses and extras are summed on the device; the caller turns them into numbers once per step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol, Union, runtime_checkable

import torch
from torch import nn

ENGINE_KINDS = ("torch", "deepspeed")
LossFn = Callable[[Callable, dict], "tuple[torch.Tensor, dict]"]


@dataclass
class StepResult:
    """One window: mean micro-batch loss (a 0-d tensor or a float), this rank's share of the tokens,
    the global gradient norm (nan when dropped), whether the update was applied, and the window's mean
    extras (tensors or floats, e.g. the autoencoder's ce / kl / accuracy)."""

    loss: Union[float, torch.Tensor]
    tokens: int
    grad_norm: float
    applied: bool
    extras: dict = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    module: nn.Module
    kind: str  # "torch" or "deepspeed": whose files save() writes; a checkpoint records it (ENGINE_KINDS)

    @property
    def device(self) -> torch.device: ...

    def step(self, batches: Iterator[dict], lr: float, loss_fn: LossFn) -> StepResult: ...

    def save(self, path: Path) -> None: ...

    def load(self, path: Path, saved_layout) -> None: ...


def to_device(raw: dict, device: torch.device) -> dict:
    """The tensors of a loader micro-batch, on `device` (other entries, e.g. names, stay behind)."""
    return {k: v.to(device, non_blocking=True) for k, v in raw.items() if isinstance(v, torch.Tensor)}


def _accumulate(sums: dict, extras: dict, n: int) -> None:
    for k, v in extras.items():
        v = v.detach().double() / n if isinstance(v, torch.Tensor) else v / n
        sums[k] = sums[k] + v if k in sums else v


def accumulate_window(forward: Callable, backward: Callable[[torch.Tensor], None], batches: Iterator[dict],
                      loss_fn: LossFn, n: int, device: torch.device, token_share: float = 1.0):
    """Forward and backward `n` micro-batches; (mean loss as a float64 0-d tensor on `device`, mean
    extras, this rank's tokens). No host sync: the loss stays on the device (float64, so that its value
    is that of a sum of the micro-batch losses as Python floats)."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    extras: dict = {}
    tokens = 0
    for _ in range(n):
        batch = to_device(next(batches), device)
        loss, extra = loss_fn(forward, batch)
        backward(loss)
        loss_sum += loss.detach().double() / n
        tokens += int(batch["ids"].numel() * token_share)
        _accumulate(extras, extra, n)
    return loss_sum, extras, tokens
