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
from calm_pretrain.parallel.engine_api import Engine, StepResult
from calm_pretrain.parallel.groups import ParallelLayout
from calm_pretrain.train.checkpoint import CheckpointError, Checkpointer, engine_kind, read_trainer_state
from calm_pretrain.train.divergence import DivergenceMonitor, TrainingDiverged
from calm_pretrain.train.schedule import lr_for
from calm_pretrain.train.signals import StopRequest
from data_pipeline.files import append_jsonl, atomic_write_text, read_jsonl


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

    def on_step_end(self, trainer: "Trainer", record: dict) -> None:
        """After every step; the record's loss and extras may still be device tensors of this rank (they
        become agreed numbers when the window of steps closes, before on_log)."""

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
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def on_log(self, trainer, record: dict) -> None:
        if self.rank == 0:
            append_jsonl(self.path, {k: None if isinstance(v, float) and not math.isfinite(v) else v
                                     for k, v in record.items()})


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
                 rank: Optional[int] = None, world_size: Optional[int] = None, flops_per_token: float = 0.0, peak_flops: float = 0.0,
                 batch_transform: Optional[Callable[[dict], dict]] = None):
        """`batch_transform`: applied to every micro-batch as the engine pulls it, after the input scan
        (data.latents=on_the_fly: data_pipeline.on_the_fly.OnTheFlyLatents, the frozen AE's encoding). Its
        `state_dict()` goes into the trainer state, `data_sources(...)` amends the loader's, and a resume
        calls its `check_resume(saved record, checkpoint)`, which refuses a checkpoint made without it."""
        self.cfg, self.model = cfg, model
        self.batch_transform = batch_transform
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
            yield raw if self.batch_transform is None else self.batch_transform(raw)

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
        """The step's record. Loss and extras stay where the engine left them (on the device) until the
        window of steps closes (_close_window); the gradient norm the engine needed anyway is a number."""
        applied = result.applied
        if applied:
            self.nonfinite_in_a_row = 0
        else:  # the engine dropped the gradients: the weights are those of the last good step
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
        self.step += 1
        record = {"step": self.step, "loss": result.loss, "grad_norm": result.grad_norm, "lr": lr,
                  "tokens": result.tokens, "skipped": not applied, **result.extras}
        self._extra_keys = sorted(result.extras)  # the architecture's (e.g. the autoencoder's ce, kl, accuracy)
        if not applied:
            record["nonfinite_inputs"] = self._bad_input_names()
        return record

    def _agree(self, window: list[dict]) -> None:
        """The window's numbers as Python floats, averaged over ranks (tokens summed): one all-reduce and
        one host sync for all its steps, whatever the window's length."""
        keys = ["loss", *self._extra_keys]
        rows = [[torch.as_tensor(r[k], dtype=torch.float64, device=self.device) for k in keys]
                + [torch.tensor(float(r["tokens"]), dtype=torch.float64, device=self.device)] for r in window]
        sums = dist.all_reduce_sum_tensor(torch.stack([torch.stack(row) for row in rows])).tolist()
        for record, row in zip(window, sums):
            for k, v in zip(keys, row):
                record[k] = v / self.world_size
            record["tokens"] = int(row[-1])

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self, max_steps: Optional[int] = None) -> list[dict]:
        """Train to `max_steps`. The host waits for the device only when a window of steps closes: on log
        steps, before every checkpoint, and on steps that must be seen (skipped, evaluated, the last, a
        stop). There the window's numbers are agreed over ranks, each of its steps is judged for
        divergence in order, and the rows are written."""
        max_steps = max_steps or self.cfg.train.max_steps
        history: list[dict] = []
        for cb in self.callbacks:
            cb.on_train_start(self)
        self.exit_reason = "running"
        vote = dist.StopVote()
        try:
            self._loop(max_steps, vote, history)
        except TrainingDiverged:  # raised on every rank alike (its numbers are agreed): commit the save in flight
            self._finish_pending_save()
            raise
        except BaseException:  # maybe this rank alone: no collective; the last committed checkpoint stays
            if self.checkpointer is not None:
                self.checkpointer.abandon_pending()
            raise
        self._finish_pending_save()
        vote.finish()
        for cb in self.callbacks:
            cb.on_train_end(self)
        return history

    def _loop(self, max_steps: int, vote, history: list[dict]) -> None:
        cfg = self.cfg.train
        window: list[dict] = []
        window_start = time.perf_counter()
        while self.step < max_steps:
            record = self.train_step()
            stop = vote(self.stop.requested() if self.stop else False)
            record["nonfinite_total"] = self.nonfinite_total
            if hasattr(self.loader, "consumed_samples"):
                record["consumed_samples"] = self.loader.consumed_samples
            history.append(record)
            window.append(record)
            for cb in self.callbacks:  # numbers still on the device: see Callback
                cb.on_step_end(self, record)
            last = stop or self.step == max_steps
            saving = self.checkpointer is not None and (last or self.step % cfg.save_every == 0)
            if (saving or last or self.step % cfg.log_every == 0 or record["skipped"]
                    or any(k.startswith("eval/") for k in record)):
                self._close_window(window, time.perf_counter() - window_start, max_steps)
                window, window_start = [], time.perf_counter()
                if self.checkpointer is not None:  # a background save whose files are all written: commit it
                    self.checkpointer.finish_pending(wait=False)
            if self.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                self.exit_reason = "nonfinite"
                raise TrainingDiverged(
                    f"{self.nonfinite_in_a_row} non-finite steps in a row at step {self.step} (train.max_nonfinite_steps="
                    f"{cfg.max_nonfinite_steps}); {self._last_good_message()}")
            if saving:  # the last save of a launch (a stop, the end) is committed before the loop ends
                self.save_checkpoint(background=cfg.async_save and not last)
            if stop:
                self.exit_reason = "preempted"
                return
        self.exit_reason = "completed"

    def _finish_pending_save(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.finish_pending(wait=True)

    def _close_window(self, window: list[dict], seconds: float, max_steps: int) -> None:
        """Agree the window's numbers, judge its steps in order and log the rows that must be seen: the
        window's last step, and any skipped, suspect or evaluated one. Raises at a step that exhausts
        train.divergence_patience."""
        self._agree(window)
        step_time = seconds / len(window)  # the window's mean: what the device took, not the host's queueing
        for record in window:
            self.tokens_seen += record["tokens"]
            record["step_time"] = step_time
            record["tokens_per_s"] = record["tokens"] / max(step_time, 1e-9)
            if self.flops_per_token and self.peak_flops:
                record["mfu"] = record["tokens_per_s"] * self.flops_per_token / (self.peak_flops * self.world_size)
            record["memory_gb"] = peak_memory_gb(self.device)
            self._judge(record)
            if record is window[-1] or record["skipped"] or record["suspect"] or any(k.startswith("eval/") for k in record):
                for cb in self.callbacks:
                    cb.on_log(self, record)
                self._print(record, max_steps, record["tokens_per_s"])
            if self.suspect_in_a_row >= self.cfg.train.divergence_patience:
                self.exit_reason = "diverged"
                raise TrainingDiverged(
                    f"training diverged: {self.suspect_in_a_row} suspect steps in a row at step {record['step']} "
                    f"(train.divergence_patience={self.cfg.train.divergence_patience}; {record['suspect']}); "
                    f"{self._last_good_message()}")

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
            self.first_suspect_step = record["step"]
            self.last_good_checkpoint = self._pin_last_good(record["step"])
            self.log(f"WARNING: step {record['step']} is suspect ({reason}); {self._last_good_message()}")

    def _pin_last_good(self, step: int) -> Optional[Path]:
        """Pin the newest intact checkpoint from before step - 1: step's loss and gradient were
        computed on the weights after update step - 1, so checkpoint step - 1 already holds them."""
        if self.checkpointer is None:
            return None
        good = self.checkpointer.newest_intact_before(step - 1)  # every rank: it verifies its share
        if good is not None:
            self.checkpointer.pin(good, f"last checkpoint before the suspect step {step}")  # rank 0 writes
        return good

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
        if self.batch_transform is not None:
            state["batch_transform"] = self.batch_transform.state_dict()
            state["data_sources"] = self.batch_transform.data_sources(state.get("data_sources"))
        return state

    def load_state_dict(self, state: dict, source: str = "checkpoint") -> None:
        changes = signature_changes(state["model_signature"], model_signature(self.model))
        if changes:
            raise CheckpointError(f"{source}: the model changed since it was saved, refusing to resume: "
                                  + "; ".join(changes))
        if self.batch_transform is not None:  # before the data check: it names the autoencoder, not only the shards
            self.batch_transform.check_resume(state.get("batch_transform"), source)
        elif state.get("batch_transform"):
            raise CheckpointError(f"{source}: was trained with a transform of every batch ({state['batch_transform']}) "
                                  f"that this run does not have (data.latents = {self.cfg.data.latents}); resume it "
                                  f"with the data settings it was trained with")
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

    def save_checkpoint(self, background: bool = False) -> Path:
        return self.checkpointer.save(self.step, self.engine, self.state_dict(), background=background)

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
