"""Divergence: a step whose loss or gradient norm spikes far above its running median is suspect.

Non-finite values are only the end of a divergence: before them come finite but enormous updates
(a too-high learning rate, a bad batch), and every checkpoint saved after them holds broken weights.
So each step's loss and (pre-clipping) gradient norm are compared with the running median of the last
``train.divergence_window`` unsuspected steps, after ``train.divergence_warmup`` of them:

    suspect  if  value > median + max((ratio - 1) * |median|, min_increase)
                 (ratio = train.divergence_ratio, min_increase = train.divergence_min_increase)

which is ``value > ratio * median`` for positive values and still means "far above" for a negative
loss (CALM's energy loss can be negative). The absolute floor keeps a loss that has fallen near zero
from turning ordinary noise into "spikes" (measured: a tiny Transformer at cross-entropy 0.04 logged a
0.39 step as suspect; real divergences move the loss by orders of magnitude). The gradient norm has
its own, larger ratio (train.divergence_grad_norm_ratio, 100): ten-fold gradient-norm spikes are
common in healthy training (the same tiny Transformer: 9.3 against a median of 0.81). A median, not a mean: one spike does not move it, so a
divergence cannot drag the reference up behind itself. Suspect and non-finite steps never enter the
window. ``train.divergence_ratio: 0`` turns the check off.

What the trainer does with it (``Trainer``): the first suspect step of an episode pins the newest intact
checkpoint whose weights produced an unsuspected step (never pruned), the stop message names it, and
``train.divergence_patience`` suspect steps in a row stop the run. An episode ends only after as many
unsuspected steps in a row: a diverged model often looks calm for a few steps (saturated to a uniform
output, zero gradients) before its norms turn non-finite, and a new episode then must not pin a
checkpoint written in that calm.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Optional


class TrainingDiverged(FloatingPointError):
    """The run stopped on non-finite or suspect steps; the message names the checkpoint to go back to."""


class DivergenceMonitor:
    def __init__(self, ratio: float = 10.0, warmup: int = 50, window: int = 100, min_increase: float = 1.0,
                 grad_norm_ratio: float = 100.0):
        self.ratio, self.warmup, self.min_increase = ratio, warmup, min_increase
        self.ratios = {"loss": ratio, "grad_norm": grad_norm_ratio if ratio > 0 else 0.0}
        self.history = {"loss": deque(maxlen=window), "grad_norm": deque(maxlen=window)}

    def check(self, loss: float, grad_norm: float) -> Optional[str]:
        """Why this step is suspect (None: it is not, and it joins the running window)."""
        values = {"loss": loss, "grad_norm": grad_norm}
        for name, value in values.items():
            if not math.isfinite(value):
                return f"{name} is {value}"
        if self.ratio > 0 and len(self.history["loss"]) >= self.warmup:
            for name, value in values.items():
                median, ratio = statistics.median(self.history[name]), self.ratios[name]
                if ratio > 0 and value > median + max((ratio - 1) * abs(median), self.min_increase):
                    key = "divergence_ratio" if name == "loss" else "divergence_grad_norm_ratio"
                    return f"{name} {value:.4g} is more than train.{key}={ratio:g} times its running median {median:.4g}"
        for name, value in values.items():
            self.history[name].append(value)
        return None

    # Kept in trainer_state.json, so a resumed run judges its first steps against the same median.
    def state_dict(self) -> dict:
        return {name: list(values) for name, values in self.history.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, values in self.history.items():
            values.clear()
            values.extend(state.get(name, []))
