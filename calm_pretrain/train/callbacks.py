"""Optional features of a run, as trainer callbacks: wandb, TensorBoard, periodic evaluation."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable

import torch

from calm_pretrain.train.trainer import Callback


def _numbers(record: dict) -> dict:
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class WandbCallback(Callback):
    """Logs every logged record to wandb from rank 0; offline (files under the run dir) without a key.

    The wandb run id is kept in the run directory, so a resumed run continues the same wandb run.
    """

    def __init__(self, run_dir: Path, config: dict, project: str, name: str, mode: str = "auto", rank: int = 0):
        self.run_dir, self.config, self.project, self.name, self.rank = Path(run_dir), config, project, name, rank
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        self.mode = mode
        self.run = None

    def on_train_start(self, trainer) -> None:
        if self.rank != 0 or self.run is not None:
            return
        import wandb

        id_file = self.run_dir / "wandb_id"
        if not id_file.is_file():
            id_file.write_text(uuid.uuid4().hex[:12])
        self.run = wandb.init(project=self.project, name=self.name, id=id_file.read_text().strip(), resume="allow",
                              dir=str(self.run_dir), config=self.config, mode=self.mode)

    def on_log(self, trainer, record: dict) -> None:
        if self.run is not None:
            self.run.log(_numbers(record), step=record["step"])

    def on_train_end(self, trainer) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class TensorBoardCallback(Callback):
    def __init__(self, log_dir: Path, rank: int = 0):
        self.log_dir, self.rank = Path(log_dir), rank
        self.writer = None

    def on_train_start(self, trainer) -> None:
        if self.rank == 0 and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir))

    def on_log(self, trainer, record: dict) -> None:
        if self.writer is not None:
            for k, v in _numbers(record).items():
                if k != "step":
                    self.writer.add_scalar(k, v, record["step"])
            self.writer.flush()

    def on_train_end(self, trainer) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class EvalCallback(Callback):
    """Every `every` steps (and at the last), `evaluate(model) -> dict` on every rank; the results join
    that step's record as ``eval/<name>`` (and so its JSONL line, wandb and TensorBoard)."""

    def __init__(self, evaluate: Callable[[torch.nn.Module], dict], every: int):
        self.evaluate, self.every = evaluate, every

    def on_step_end(self, trainer, record: dict) -> None:
        if trainer.step % self.every and trainer.step != trainer.cfg.train.max_steps:
            return
        model = trainer.model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            result = self.evaluate(model)
        model.train(was_training)
        record.update({f"eval/{k}": v for k, v in result.items()})
        trainer.log(f"[{trainer.cfg.name}] step {trainer.step} eval: "
                    + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
