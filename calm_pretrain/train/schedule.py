"""Learning-rate schedule: linear warm-up, then constant or cosine decay to `min_lr`.

The reference scripts asked for 2,000 warm-up steps with HF's "constant" schedule, which ignores
them; here warm-up always applies.
"""
from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, warmup_steps: int, max_steps: int, decay: str = "constant",
          min_lr: float = 0.0) -> float:
    """LR for optimizer step `step` (0-based): step 0 runs at lr/warmup_steps, step warmup_steps−1 at lr."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if decay == "constant":
        return lr
    if decay == "cosine":
        span = max(1, max_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"train.lr_decay: unknown schedule {decay!r} (constant or cosine)")


def lr_for(step: int, train_cfg) -> float:
    """`lr_at` with the values of a TrainConfig."""
    return lr_at(step, lr=train_cfg.lr, warmup_steps=train_cfg.warmup_steps, max_steps=train_cfg.max_steps,
                 decay=train_cfg.lr_decay, min_lr=train_cfg.min_lr)
