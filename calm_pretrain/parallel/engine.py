"""Engines: what owns backward and the optimizer step. The training loop talks only to this interface.

* :class:`TorchEngine` — one process, plain PyTorch AdamW (the bare baseline and the fallback).
* :class:`DeepSpeedEngine` — DeepSpeed's engine: ZeRO stage 0-3, gradient accumulation, clipping,
  AdamW, bf16 on GPU (fp32 on CPU). Tensor and pipeline parallelism come in through the same class
  (a megatron-core plan applied to the model first, a PipelineModule instead of the model).

Both expose: ``forward``-through ``module``, ``backward(loss)`` (loss of one micro-batch, unscaled),
``step(lr, apply) -> grad_norm`` at the end of an accumulation window (``apply=False`` drops the
window's gradients and keeps the weights).
"""
from __future__ import annotations

import math
import os
import sys
from typing import Optional

import torch
from torch import nn

from calm_pretrain.config import RunConfig


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms and biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class TorchEngine:
    def __init__(self, model: nn.Module, cfg: RunConfig):
        self.module, self.cfg = model, cfg
        fused = all(p.is_cuda for p in model.parameters())
        self.optimizer = torch.optim.AdamW(_param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                                           betas=(cfg.train.beta1, cfg.train.beta2), fused=fused)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.train.grad_accum_steps).backward()

    def step(self, lr: float, apply: bool = True) -> float:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.train.grad_clip).item()
        if apply and math.isfinite(grad_norm):
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm


def deepspeed_config(cfg: RunConfig, world_size: int, on_gpu: bool) -> dict:
    """The DeepSpeed JSON for a run: every value comes from the RunConfig."""
    t = cfg.train
    bf16 = t.precision == "bf16" or (t.precision == "auto" and on_gpu)
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": {"stage": t.zero_stage},
        # DeepSpeed's own CPU Adam is a C++ op compiled on first use; torch's AdamW needs no build.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def init_distributed() -> tuple[int, int]:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU); (rank, world_size)."""
    if "RANK" not in os.environ:
        return 0, 1
    import deepspeed

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # Its shared-memory all-reduce op would be JIT-compiled (~90 s); gloo does the same job here.
        # (Patched through sys.modules: the module object differs from what a plain import returns.)
        import deepspeed.comm.torch  # noqa: F401
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


class DeepSpeedEngine:
    def __init__(self, model: nn.Module, cfg: RunConfig, world_size: Optional[int] = None):
        import deepspeed

        self.cfg = cfg
        world_size = world_size or (torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)
        optimizer = torch.optim.AdamW(_param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                                      betas=(cfg.train.beta1, cfg.train.beta2))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, world_size, torch.cuda.is_available()))
        self.module = self.engine.module

    def backward(self, loss: torch.Tensor) -> None:
        """DeepSpeed divides by the accumulation steps itself and must see one step() per micro-batch
        (inside the window step() only advances its counter; ZeRO reduces gradients at the boundary)."""
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def step(self, lr: float, apply: bool = True) -> float:
        """End of the accumulation window: clip, update (DeepSpeed does both), return the grad norm."""
        if not apply:
            raise FloatingPointError("non-finite loss under DeepSpeed: skipping the step is not supported yet")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")
