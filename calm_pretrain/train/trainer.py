"""The training loop: one readable step function, metrics as JSONL, optional features as callbacks.

The engine (`calm_pretrain.parallel.engine`: plain PyTorch, or DeepSpeed ZeRO under torchrun) owns
backward and the optimizer step; the loop, the per-architecture loss and the metrics do not change
with it. Checkpoint/resume, signals and the wandb/TensorBoard callbacks come with the trainer issue.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from calm_pretrain.config import AutoencoderConfig, CALMConfig, RunConfig
from calm_pretrain.parallel.engine import TorchEngine
from calm_pretrain.train.schedule import lr_for


def model_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """The training loss of any architecture on a loader batch, and what to log beside it."""
    if isinstance(model.config, AutoencoderConfig):
        out = model(batch["ids"])
        return out.loss, {"ce": out.ce.item(), "kl": out.kl.item(), "accuracy": out.accuracy.item()}
    if isinstance(model.config, CALMConfig):
        return model(batch["ids"], batch["mu"], batch["log_sigma"]).loss, {}
    return model(batch["ids"]).loss, {}


class JSONLMetrics:
    """Appends one JSON object per logged step; the source of truth for tests and sweeps."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class Trainer:
    def __init__(self, cfg: RunConfig, model: nn.Module, batches: Iterable[dict], out_dir: Path,
                 callbacks: Iterable[Callable[[dict], None]] = (), log: Callable[[str], None] = print,
                 engine=None):
        self.cfg, self.model = cfg, model
        self.batches: Iterator[dict] = iter(batches)
        self.engine = engine or TorchEngine(model, cfg)
        self.out_dir = Path(out_dir)
        self.metrics = JSONLMetrics(self.out_dir / "metrics.jsonl")
        self.callbacks = [self.metrics, *callbacks]
        self.log = log
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.device = next(model.parameters()).device

    def train_step(self) -> dict:
        """One optimizer step: accumulate `grad_accum_steps` micro-batches, clip, update."""
        cfg = self.cfg.train
        lr = lr_for(self.step, cfg)
        self.model.train()
        total, extras, tokens = 0.0, {}, 0
        for _ in range(cfg.grad_accum_steps):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in next(self.batches).items()
                     if isinstance(v, torch.Tensor)}
            loss, extra = model_loss(self.model, batch)
            self.engine.backward(loss)
            total += loss.item() / cfg.grad_accum_steps
            tokens += batch["ids"].numel()
            for k, v in extra.items():
                extras[k] = extras.get(k, 0.0) + v / cfg.grad_accum_steps
        grad_norm = self.engine.step(lr, apply=math.isfinite(total))
        finite = math.isfinite(total) and math.isfinite(grad_norm)
        if finite:
            self.nonfinite_in_a_row = 0
        else:  # the engine skipped the update: the weights are those of the last good step
            self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                raise FloatingPointError(f"{self.nonfinite_in_a_row} non-finite steps in a row at step {self.step}")
        self.step += 1
        return {"step": self.step, "loss": total, "grad_norm": grad_norm, "lr": lr, "tokens": tokens,
                "skipped": not finite, **extras}

    def fit(self, max_steps: Optional[int] = None) -> list[dict]:
        max_steps = max_steps or self.cfg.train.max_steps
        history = []
        start = time.perf_counter()
        tokens_seen = 0
        while self.step < max_steps:
            t0 = time.perf_counter()
            record = self.train_step()
            record["step_time"] = time.perf_counter() - t0
            tokens_seen += record["tokens"]
            record["tokens_per_s"] = record["tokens"] / max(record["step_time"], 1e-9)
            history.append(record)
            if self.step % self.cfg.train.log_every == 0 or self.step == max_steps:
                for cb in self.callbacks:
                    cb(record)
                elapsed = time.perf_counter() - start
                self.log(f"[{self.cfg.name}] step {self.step}/{max_steps} loss {record['loss']:.4f} "
                         f"lr {record['lr']:.2e} grad_norm {record['grad_norm']:.3f} "
                         f"{tokens_seen / elapsed:,.0f} tok/s"
                         + (f" acc {record['accuracy']:.4f}" if "accuracy" in record else ""))
        return history
