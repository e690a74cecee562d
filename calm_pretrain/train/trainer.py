"""The training loop: one readable step function, checkpoints, preemption, metrics through callbacks.

The engine (`calm_pretrain.parallel.engine_api.Engine`: plain PyTorch, DeepSpeed ZeRO under torchrun,
or a DeepSpeed pipeline) runs a whole accumulation window (forward, backward, the optimizer step); the
loop, the per-architecture loss, checkpointing and the metrics do not change with it. Everything with state exposes ``state_dict`` / ``load_state_dict``:
the trainer's own (step, counters) goes into ``trainer_state.json`` together with the loader's.
"""
from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from calm_pretrain.config import RunConfig
from calm_pretrain.models.registry import spec_of
from calm_pretrain.parallel import distributed as dist
from calm_pretrain.parallel.engine import TorchEngine
from calm_pretrain.parallel.engine_api import Engine, StepResult, as_number
from calm_pretrain.parallel.groups import ParallelLayout
from calm_pretrain.train.checkpoint import CheckpointError, Checkpointer, engine_kind, read_trainer_state
from calm_pretrain.train.divergence import DivergenceMonitor, TrainingDiverged
from calm_pretrain.train.schedule import lr_for
from calm_pretrain.train.signals import StopRequest


def model_loss(config, forward: Callable, batch: dict) -> tuple[torch.Tensor, dict]:
    """The training loss of any architecture on a loader batch, and what to log beside it (its spec's)."""
    return spec_of(config).loss(forward, batch)


def model_signature(model: nn.Module) -> dict:
    """Architecture and every parameter's full shape (not a ZeRO-3 partition or a tensor-parallel slice):
    what must not change across a resume, at any layout."""
    shapes = {name: list(getattr(p, "unsplit_shape", getattr(p, "ds_shape", p.shape)))
              for name, p in model.named_parameters()}
    return {"arch": model.config.arch, "parameters": shapes}


def signature_changes(saved: dict, now: dict, limit: int = 5) -> list[str]:
    changes = []
    if saved["arch"] != now["arch"]:
        changes.append(f"model.arch {saved['arch']} -> {now['arch']}")
    a, b = saved["parameters"], now["parameters"]
    changes += [f"{n}: {a[n]} -> {b[n]}" for n in a if n in b and a[n] != b[n]]
    changes += [f"{n}: missing now" for n in a if n not in b]
    changes += [f"{n}: new" for n in b if n not in a]
    return changes[:limit] + ([f"... {len(changes) - limit} more"] if len(changes) > limit else [])


class Callback:
    """Optional features hook in here; every rank calls every hook (collectives are allowed)."""

    def on_train_start(self, trainer: "Trainer") -> None: ...

    def on_step_end(self, trainer: "Trainer", record: dict) -> None: ...

    def on_log(self, trainer: "Trainer", record: dict) -> None: ...

    def on_train_end(self, trainer: "Trainer") -> None: ...


class JSONLMetrics(Callback):
    """One JSON object per logged step (rank 0); the source of truth for tests and sweeps.

    On resume, records of steps after the checkpoint (computed again) are dropped first, and a fresh
    start (no checkpoint) drops every record of a run killed before its first save: the file holds each
    step once, as if the run had never stopped. Non-finite numbers are written as null (valid JSON;
    bare NaN is not).
    """

    def __init__(self, path: Path, rank: int = 0):
        self.path, self.rank = Path(path), rank

    def truncate_after(self, step: int) -> None:
        if self.rank != 0 or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(x + "\n" for x in kept))
        tmp.replace(self.path)

    def on_log(self, trainer, record: dict) -> None:
        if self.rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            with self.path.open("a") as f:
                f.write(json.dumps(clean, allow_nan=False) + "\n")


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: allocated device memory on GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Trainer:
    def __init__(self, cfg: RunConfig, model: nn.Module, batches: Iterable[dict], out_dir: Path, *,
                 engine: Optional[Engine] = None, callbacks: Iterable[Callback] = (),
                 log: Callable[[str], None] = print,
                 checkpointer: Optional[Checkpointer] = None, stop: Optional[StopRequest] = None,
                 rank: Optional[int] = None, world_size: Optional[int] = None, flops_per_token: float = 0.0, peak_flops: float = 0.0):
        self.cfg, self.model = cfg, model
        self.loader = batches
        self.batches = iter(batches)
        self.engine = engine or TorchEngine(model, cfg)
        self.out_dir = Path(out_dir)
        self.rank = dist.rank() if rank is None else rank
        self.world_size = dist.world_size() if world_size is None else world_size
        self.metrics = JSONLMetrics(self.out_dir / "metrics.jsonl", self.rank)
        self.callbacks = [self.metrics, *callbacks]
        self.log = log if self.rank == 0 else (lambda s: None)
        self.checkpointer, self.stop = checkpointer, stop
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.suspect_in_a_row = self.calm_in_a_row = 0
        self.first_suspect_step: Optional[int] = None  # of the current episode of suspect steps
        self.last_good_checkpoint: Optional[Path] = None  # pinned at that step
        self.divergence = DivergenceMonitor(cfg.train.divergence_ratio, cfg.train.divergence_warmup,
                                            cfg.train.divergence_window, cfg.train.divergence_min_increase,
                                            cfg.train.divergence_grad_norm_ratio)
        self.tokens_seen = 0
        self._bad_inputs: list[tuple[int, int]] = []  # this step's samples with non-finite inputs
        self.exit_reason = "running"
        # A pipeline rank holds only its stage's weights (the rest of `model` is on the meta device).
        self.device = self.engine.device

    # ---- one optimizer step ------------------------------------------------------------------
    def train_step(self) -> dict:
        """One accumulation window of `grad_accum_steps` micro-batches, run by the engine: clip, update, or
        skip the update if the gradient norm is not finite (the norm is global: every rank decides alike)."""
        lr = lr_for(self.step, self.cfg.train)
        self.model.train()
        self._bad_inputs = []
        config = self.model.config
        result = self.engine.step(self._scanned(), lr, lambda forward, batch: model_loss(config, forward, batch))
        return self._count(lr, result)

    def _scanned(self):
        """The loader's micro-batches, each scanned for non-finite inputs as the engine pulls it."""
        for raw in self.batches:
            self._scan_inputs(raw)
            yield raw

    def _scan_inputs(self, batch: dict) -> None:
        """Remember the (dataset, index) of samples whose float inputs (CALM's latents) are not finite."""
        if "index" not in batch:
            return
        for key in ("mu", "log_sigma"):
            if key in batch:
                bad = ~torch.isfinite(batch[key]).flatten(1).all(1)
                self._bad_inputs += [(int(batch["dataset"][i]), int(batch["index"][i])) for i in bad.nonzero()[:, 0]]

    def _bad_input_names(self) -> list[str]:
        """Every rank's non-finite samples of this step, named by shard (called on skipped steps only,
        which every rank sees alike)."""
        found = sorted({x for part in dist.all_gather_object(self._bad_inputs) for x in part})
        describe = getattr(self.loader, "describe_sample", None)
        return [describe(ds, i) if describe else f"sample {i} of dataset {ds}" for ds, i in found]

    def _count(self, lr: float, result: StepResult) -> dict:
        """The step's record; the engine's on-device sums become numbers here, once per step."""
        applied = result.applied
        if applied:
            self.nonfinite_in_a_row = 0
        else:  # the engine dropped the gradients: the weights are those of the last good step
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
        self.step += 1
        extras = {k: as_number(v) for k, v in result.extras.items()}
        record = {"step": self.step, "loss": as_number(result.loss), "grad_norm": result.grad_norm, "lr": lr,
                  "tokens": result.tokens, "skipped": not applied, **extras}
        if not applied:
            record["nonfinite_inputs"] = self._bad_input_names()
        return record

    def _agree(self, record: dict) -> bool:
        """One all-reduce per step: mean loss and extras over ranks, global tokens, and the stop vote."""
        keys = ["loss", *sorted(k for k in ("ce", "kl", "accuracy") if k in record)]
        stop_vote = float(self.stop.requested()) if self.stop else 0.0
        sums = dist.all_reduce_sum([record[k] for k in keys] + [record["tokens"], stop_vote])
        for k, v in zip(keys, sums):
            record[k] = v / self.world_size
        record["tokens"] = int(sums[len(keys)])
        return sums[-1] > 0

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self, max_steps: Optional[int] = None) -> list[dict]:
        cfg = self.cfg.train
        max_steps = max_steps or cfg.max_steps
        history: list[dict] = []
        for cb in self.callbacks:
            cb.on_train_start(self)
        start, start_tokens = time.perf_counter(), self.tokens_seen
        self.exit_reason = "running"
        while self.step < max_steps:
            t0 = time.perf_counter()
            record = self.train_step()
            stop = self._agree(record)
            record["step_time"] = time.perf_counter() - t0
            self.tokens_seen += record["tokens"]
            record["tokens_per_s"] = record["tokens"] / max(record["step_time"], 1e-9)
            if self.flops_per_token and self.peak_flops:
                record["mfu"] = record["tokens_per_s"] * self.flops_per_token / (self.peak_flops * self.world_size)
            record["memory_gb"] = peak_memory_gb(self.device)
            self._judge(record)
            record["nonfinite_total"] = self.nonfinite_total
            if hasattr(self.loader, "consumed_samples"):
                record["consumed_samples"] = self.loader.consumed_samples
            history.append(record)
            for cb in self.callbacks:
                cb.on_step_end(self, record)
            evaluated = any(k.startswith("eval/") for k in record)
            if (self.step % cfg.log_every == 0 or self.step == max_steps or stop or record["skipped"] or evaluated
                    or record["suspect"]):
                for cb in self.callbacks:
                    cb.on_log(self, record)
                self._print(record, max_steps, (self.tokens_seen - start_tokens) / (time.perf_counter() - start))
            if self.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                self.exit_reason = "nonfinite"
                raise TrainingDiverged(
                    f"{self.nonfinite_in_a_row} non-finite steps in a row at step {self.step} (train.max_nonfinite_steps="
                    f"{cfg.max_nonfinite_steps}); {self._last_good_message()}")
            if self.suspect_in_a_row >= cfg.divergence_patience:
                self.exit_reason = "diverged"
                raise TrainingDiverged(
                    f"training diverged: {self.suspect_in_a_row} suspect steps in a row at step {self.step} "
                    f"(train.divergence_patience={cfg.divergence_patience}; {record['suspect']}); "
                    f"{self._last_good_message()}")
            if self.checkpointer and (stop or self.step % cfg.save_every == 0 or self.step == max_steps):
                self.save_checkpoint()
            if stop:
                self.exit_reason = "preempted"
                break
        else:
            self.exit_reason = "completed"
        for cb in self.callbacks:
            cb.on_train_end(self)
        return history

    def _print(self, r: dict, max_steps: int, tok_per_s: float) -> None:
        self.log(f"[{self.cfg.name}] step {r['step']}/{max_steps} loss {r['loss']:.4f} lr {r['lr']:.2e} "
                 f"grad_norm {r['grad_norm']:.3f} {tok_per_s:,.0f} tok/s"
                 + (f" mfu {100 * r['mfu']:.1f}%" if "mfu" in r else "")
                 + (f" acc {r['accuracy']:.4f}" if "accuracy" in r else "")
                 + (" SKIPPED (non-finite" + "".join(f"; not finite: {x}" for x in r.get("nonfinite_inputs", []))
                    + ")" if r["skipped"] else "")
                 + (f" SUSPECT ({r['suspect']})" if r["suspect"] and not r["skipped"] else ""))

    # ---- divergence --------------------------------------------------------------------------
    def _judge(self, record: dict) -> None:
        """Mark a suspect step (record["suspect"]: why, or ""). The first of an episode pins the
        last checkpoint before it. Loss and norm are agreed over ranks: every rank judges alike."""
        reason = self.divergence.check(record["loss"], record["grad_norm"])
        record["suspect"] = reason or ""
        if reason is None:  # finite and unsuspected
            self.suspect_in_a_row = 0
            self.calm_in_a_row += 1
            if self.calm_in_a_row >= self.cfg.train.divergence_patience:
                self.first_suspect_step = self.last_good_checkpoint = None  # the episode is over
            return
        self.calm_in_a_row = 0
        if not record["skipped"]:  # non-finite steps are counted by nonfinite_in_a_row
            self.suspect_in_a_row += 1
        if self.first_suspect_step is None:
            self.first_suspect_step = self.step
            self.last_good_checkpoint = self._pin_last_good(self.step)
            self.log(f"WARNING: step {self.step} is suspect ({reason}); {self._last_good_message()}")

    def _pin_last_good(self, step: int) -> Optional[Path]:
        """Pin the newest intact checkpoint from before step - 1: step's loss and gradient were
        computed on the weights after update step - 1, so checkpoint step - 1 already holds them."""
        if self.checkpointer is None:
            return None
        name = None
        if self.rank == 0:
            good = self.checkpointer.newest_intact_before(step - 1)
            if good is not None:
                self.checkpointer.pin(good, f"last checkpoint before the suspect step {step}")
                name = str(good)
        name = dist.broadcast_object(name)
        return Path(name) if name else None

    def _last_good_message(self) -> str:
        t = self.first_suspect_step
        if self.last_good_checkpoint is None:
            return f"no checkpoint was saved before the first suspect step {t}"
        return (f"the newest checkpoint before the first suspect step {t} is {self.last_good_checkpoint}, "
                f"kept (pinned in {self.checkpointer.root / 'pinned.json'}: never pruned); later "
                f"checkpoints may hold diverged weights")

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"step": self.step, "nonfinite_total": self.nonfinite_total, "tokens_seen": self.tokens_seen,
                 "divergence": {**self.divergence.state_dict(), "first_suspect_step": self.first_suspect_step,
                                "last_good_checkpoint": str(self.last_good_checkpoint or "")},
                 "model_signature": model_signature(self.model), "config": self.cfg.to_dict()}
        if hasattr(self.loader, "state_dict"):
            state["loader"] = self.loader.state_dict()
            state["consumed_samples"] = self.loader.consumed_samples
            state["data_fingerprint"] = self.loader.data_fingerprint
            state["data"] = [str(m.path) for m in self.loader.manifests]
            # The tokenizer / autoencoder fingerprints of the shards: export checks a release against them.
            state["data_sources"] = getattr(self.loader, "data_sources", None)
        return state

    def load_state_dict(self, state: dict, source: str = "checkpoint") -> None:
        changes = signature_changes(state["model_signature"], model_signature(self.model))
        if changes:
            raise CheckpointError(f"{source}: the model changed since it was saved, refusing to resume: "
                                  + "; ".join(changes))
        if "loader" in state:
            if not hasattr(self.loader, "load_state_dict"):
                raise CheckpointError(f"{source}: holds a data-loader position but this run's data has none")
            if state["data_fingerprint"] != self.loader.data_fingerprint:
                now = [str(m.path) for m in self.loader.manifests]
                raise CheckpointError(
                    f"{source}: the training data changed since it was saved, refusing to resume "
                    f"(data fingerprint {state['data_fingerprint']} -> {self.loader.data_fingerprint}; "
                    f"data.train was {state['data']}, now {now}: other shards, contents or blend weights)")
            self.loader.load_state_dict(state["loader"])
            old_dp = state["loader"]["dp_world_size"]
            if old_dp != self.loader.dp_world_size:
                self.log(f"resuming at data-parallel size {self.loader.dp_world_size} (was {old_dp}): same global "
                         f"sample order, continuing at sample {self.loader.consumed_samples:,}")
        self.step = state["step"]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.tokens_seen = state.get("tokens_seen", 0)
        divergence = state.get("divergence", {})
        self.divergence.load_state_dict(divergence)
        self.first_suspect_step = divergence.get("first_suspect_step")  # an open episode goes on
        self.last_good_checkpoint = Path(divergence["last_good_checkpoint"]) \
            if divergence.get("last_good_checkpoint") else None

    def save_checkpoint(self) -> Path:
        return self.checkpointer.save(self.step, self.engine, self.state_dict())

    def _check_engine_kind(self, path: Path, state: dict) -> None:
        """A plain-PyTorch checkpoint (engine.pt) and a DeepSpeed one are not interchangeable: say what to
        launch instead of failing inside the engine's loader."""
        plain_checkpoint = engine_kind(path, state) == "torch"  # the checkpoint's record
        plain_run = self.engine.kind == "torch"
        if plain_checkpoint and not plain_run:
            raise CheckpointError(
                f"{path}: written by one plain-PyTorch process (engine/engine.pt), but this run uses DeepSpeed "
                f"({self.world_size} processes): resume it in one process without torchrun (train.engine=torch), "
                f"or export it (calm-pretrain export) and start a DeepSpeed run with train.init_from=<release>")
        if not plain_checkpoint and plain_run:
            raise CheckpointError(
                f"{path}: written by DeepSpeed (world size {state.get('world_size', '?')}), but this run is one "
                f"plain-PyTorch process: launch it under torchrun (calm-pretrain launch --standalone --nproc-per-node N "
                f"-- train ...; another N is converted) or srun")

    def resume(self) -> Optional[Path]:
        """Continue from the newest intact checkpoint, if there is one; returns its path."""
        if self.checkpointer is None:
            return None
        path = self.checkpointer.find_resumable()
        if path is None:
            self.metrics.truncate_after(0)  # the rows of a run killed before its first checkpoint
            return None
        state = read_trainer_state(path)
        self._check_engine_kind(path, state)
        self.load_state_dict(state, source=str(path))  # refuses changed models or data before any loading
        saved = ParallelLayout.of_run(state["config"].get("parallel", {}), state["world_size"])
        now = ParallelLayout.of_run(self.cfg.parallel, self.world_size)
        if saved != now:
            self.log(f"resuming at layout {now} (was {saved}): the checkpoint is converted to DeepSpeed's "
                     f"universal format and re-partitioned")
        self.engine.load(path / "engine", saved)
        exact = self.checkpointer.load_rng(path) and saved == now
        self.metrics.truncate_after(self.step)
        self.log(f"resumed from {path} at step {self.step}"
                 + ("" if exact else f" (layout {saved} -> {now}: RNG streams differ)"))
        return path
