"""Checkpoints: complete and verified before `latest` names them, the last k kept, damage detected.

Layout of a run directory's ``checkpoints/``::

    step_00001000/
      engine/                 the engine's files (DeepSpeed: every rank's model/optimizer partition)
      rng/rank_00000.pt ...   every rank's RNG states (torch, CUDA, numpy, python)
      trainer_state.json      step, consumed samples, loader state, data fingerprint, model signature,
                              the resolved config, the world size and the engine that wrote engine/
                              ("torch" or "deepspeed"; with config and world size, the saved layout)
      manifest.json           size, digest (XXH3-128) and writing rank of every file above; written last
    latest                    the name of the newest complete checkpoint (replaced atomically)

A save goes to ``step_N.partial/`` and is renamed to ``step_N/`` only after every rank finished
writing (each rank hashing its files as it writes them, checkpoint_files.py) and rank 0 wrote the
manifest; ``latest`` is replaced after that. A save killed half-way
therefore leaves a ``.partial`` directory (removed by the next save) and never touches the previous
checkpoint. On resume rank 0 checks the manifest (presence, sizes) and every rank checksums its share
of the files; a damaged checkpoint is reported by name and the newest intact one before it is used.

A background save (``train.async_save``) writes the same files from a host copy of the state on a
thread (``parallel/hashed_writes.py``) and is committed the same way by :meth:`Checkpointer.finish_pending`
once every rank's writer is done; until then it is a ``.partial`` directory like any unfinished save.

Pruning keeps the newest ``keep_last`` *intact* checkpoints: a damaged one never counts (it is left in
place, named in the log, and replaced when the run saves that step again), the checkpoint this run
resumed from stays until a newer intact one exists, and a pinned checkpoint (``pinned.json``: the last
one before a divergence, see ``divergence.py``) is never pruned. ``latest`` names only checkpoints
that were just written or verified.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from calm_pretrain.errors import CheckpointError
from calm_pretrain.parallel.distributed import all_gather_object, barrier, broadcast_object
from calm_pretrain.parallel.engine_api import ENGINE_KINDS
from calm_pretrain.parallel.groups import ParallelLayout
from calm_pretrain.parallel.hashed_writes import (CHECKPOINT_HASH, BackgroundWriter, HostBuffers, WriteLedger,
                                                  digest_of, hashed_save, recording)
from calm_pretrain.safe_load import safe_load
from calm_pretrain.train.checkpoint_files import (MANIFEST, check_manifest, checksum_problems, merge_claims,
                                                  share_of, verify_checkpoint)
from data_pipeline.files import atomic_write_bytes, fsync_dir

__all__ = ["CheckpointError", "Checkpointer", "verify_checkpoint", "MANIFEST"]

CHECKPOINT_VERSION = 1
LATEST = "latest"
PINNED = "pinned.json"
TRAINER_STATE = "trainer_state.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ---- RNG states ------------------------------------------------------------------------------
def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


# ---- files -----------------------------------------------------------------------------------
def read_trainer_state(path: Path) -> dict:
    return json.loads((path / TRAINER_STATE).read_text())


def engine_kind(path: Path, state: dict) -> str:
    """Which engine wrote the checkpoint at `path` ("torch" or "deepspeed"), as its trainer state
    `state` records it."""
    kind = state.get("engine")
    if kind is None:
        return _legacy_engine_kind(path)
    if kind not in ENGINE_KINDS:
        raise CheckpointError(f"{path / TRAINER_STATE}: unknown engine {kind!r} (expected one of {ENGINE_KINDS})")
    return kind


def _legacy_engine_kind(path: Path) -> str:
    """For checkpoints saved before trainer_state.json recorded its engine (no "engine" field), inferred
    once, here: the plain-PyTorch engine is the one that writes engine/engine.pt. Nothing else decides
    anything from a checkpoint's file names."""
    return "torch" if (path / "engine" / "engine.pt").is_file() else "deepspeed"


@dataclasses.dataclass
class PendingSave:
    """A save whose files are written (or being written, by `writer`) and not yet committed."""
    step: int
    partial: Path
    final: Path
    writer: Optional[BackgroundWriter]
    ledger: Optional[WriteLedger] = None
    started: float = dataclasses.field(default_factory=time.perf_counter)


class Checkpointer:
    """Saves and finds checkpoints under ``root``; every rank calls every method (collectives inside)."""

    def __init__(self, root: Path, keep_last: int = 3, rank: int = 0, world_size: int = 1,
                 log: Callable[[str], None] = print):
        self.root, self.keep_last = Path(root), keep_last
        self.rank, self.world_size, self.log = rank, world_size, log
        # What this process knows of each checkpoint (name -> problem, None = intact): a checkpoint is
        # checksummed at most once per launch, however often pruning looks at it.
        self._problems: dict[str, Optional[str]] = {}
        self.resumed_from: Optional[Path] = None
        self.pending: Optional[PendingSave] = None  # a background save not yet committed
        self._buffers = HostBuffers()  # the host copies background saves write from, reused

    # ---- saving ------------------------------------------------------------------------------
    def save(self, step: int, engine, trainer_state: dict, background: bool = False) -> Path:
        """Write checkpoint `step` and commit it (manifest, rename, `latest`, pruning). With
        `background`, the state is copied and written on a thread while training goes on, and the
        checkpoint is committed by a later :meth:`finish_pending`; at most one save is in flight
        (a second one waits for the first). Collective: every rank calls it."""
        self.finish_pending(wait=True)
        final = self.root / step_dir_name(step)
        partial = final.with_name(final.name + ".partial")
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("*.partial"):  # left by a save that was killed
                shutil.rmtree(stale)
            if final.exists():  # the same step saved before a preemption: replace it
                shutil.rmtree(final)
            (partial / "rng").mkdir(parents=True)
        barrier()
        pending = PendingSave(step, partial, final, BackgroundWriter(self._buffers) if background else None)
        with recording(pending.writer) as pending.ledger:
            self._write(partial, step, engine, trainer_state, pending.ledger)
        if background:
            pending.writer.start()
            self.pending = pending
            return final
        return self._commit_pending(pending)

    def finish_pending(self, wait: bool = True) -> Optional[Path]:
        """Commit the save in flight, if any: the checkpoint's path once committed, else None. Without
        `wait`, only if every rank's writer is already done. Collective: every rank calls it."""
        pending = self.pending
        if pending is None:
            return None
        if not wait and not all(self._gather(pending.writer.done())):
            return None
        self.pending = None
        return self._commit_pending(pending)

    def abandon_pending(self) -> None:
        """After an error on this rank alone: let the writer finish its files, commit nothing (no
        collective). The partial directory is removed by the next save; the last committed checkpoint
        stays what `latest` names."""
        if self.pending is not None:
            self.pending.writer.wait()
            self.pending = None

    def _gather(self, obj) -> list:
        return all_gather_object(obj) if self.world_size > 1 else [obj]

    def _commit_pending(self, pending: "PendingSave") -> Path:
        """Every rank's files are written and hashed; rank 0 checks the claims against the files and
        writes the manifest, or every rank raises the same error."""
        failed = pending.writer.wait() if pending.writer else None
        mine = {rel: (size, digest, self.rank) for rel, (size, digest) in pending.ledger.relative_to(pending.partial).items()}
        reports = self._gather((mine, failed))
        self._verify_all(self._listed())  # the older checkpoints pruning looks at, checksummed together
        error = None
        if self.rank == 0:
            failures = [f"rank {r} could not write {f}" for r, (_, f) in enumerate(reports) if f]
            entries, error = merge_claims(pending.partial, [claims for claims, _ in reports])
            error = "; ".join(failures) or error
            if error is None:
                self._commit(pending.partial, pending.final, pending.step, entries, pending.started,
                             background=pending.writer is not None)
        error = broadcast_object(error)
        if error:
            raise CheckpointError(f"checkpoint {pending.partial} not saved: {error}")
        self._problems[pending.final.name] = None  # just written and hashed
        barrier()
        return pending.final

    def _write(self, partial: Path, step: int, engine, trainer_state: dict, ledger: WriteLedger) -> None:
        """This rank's files of the checkpoint, each hashed as it is written."""
        engine.save(partial / "engine")
        hashed_save(rng_state(), partial / "rng" / f"rank_{self.rank:05d}.pt")
        if self.rank == 0:
            state = {"version": CHECKPOINT_VERSION, "step": step, "world_size": self.world_size,
                     "engine": engine.kind, **trainer_state}
            data = json.dumps(state, indent=1).encode()
            (partial / TRAINER_STATE).write_bytes(data)
            ledger.record(partial / TRAINER_STATE, len(data), digest_of(data))

    def _commit(self, partial: Path, final: Path, step: int, entries: dict, t0: float, background: bool) -> None:
        """Rank 0: the manifest, the rename to step_N, `latest`, pruning."""
        manifest = {"version": CHECKPOINT_VERSION, "step": step, "world_size": self.world_size,
                    "hash": CHECKPOINT_HASH, "files": entries,
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_bytes(partial / MANIFEST, json.dumps(manifest, indent=1).encode())
        os.replace(partial, final)
        fsync_dir(self.root)
        self._problems[final.name] = None
        atomic_write_bytes(self.root / LATEST, (final.name + "\n").encode())
        self._prune(final)
        size = sum(e[0] for e in entries.values())
        self.log(f"checkpoint {final} saved ({len(entries)} files, {size / 2**20:.1f} MiB, "
                 f"{time.perf_counter() - t0:.1f}s" + (", written in the background)" if background else ")"))

    # ---- verifying (every rank its share) ----------------------------------------------------
    def _bcast(self, obj):
        return broadcast_object(obj) if self.world_size > 1 else obj

    def _listed(self) -> list[Path]:
        """complete_checkpoints() as rank 0 sees them, on every rank."""
        names = self._bcast([p.name for p in self.complete_checkpoints()] if self.rank == 0 else None)
        return [self.root / n for n in names]

    def _verify(self, path: Path) -> Optional[str]:
        """What is wrong with `path` (None: intact). Collective: rank 0 reads the manifest and checks
        presence and sizes, every rank checksums its share, the problems are all-gathered."""
        head = check_manifest(path) if self.rank == 0 else None
        manifest, problem = self._bcast(head)
        if problem:
            return problem
        mine = checksum_problems(path, manifest, share_of(manifest, self.rank, self.world_size))
        found = [p for part in self._gather(mine) for p in part]
        return "; ".join(found) or None

    def _verify_all(self, paths: list[Path]) -> None:
        for path in paths:
            if path.name not in self._problems:
                self._problems[path.name] = self._verify(path)

    def problem(self, path: Path) -> Optional[str]:
        """What is wrong with the checkpoint at `path` (None: intact), checksummed once per launch.
        Collective (every rank calls it) unless already known."""
        self._verify_all([path])
        return self._problems[path.name]

    def _known(self, path: Path) -> Optional[str]:
        """problem(path) in this process alone: what every rank verified together before (save() does
        so for every checkpoint pruning sees), or, for one nobody listed then, checked here whole."""
        if path.name not in self._problems:
            self._problems[path.name] = verify_checkpoint(path)
        return self._problems[path.name]

    def _prune(self, newest: Path) -> None:
        """Delete intact checkpoints beyond the newest `keep_last` intact ones, except the one just saved,
        the one this run resumed from (until a newer intact one exists) and pinned ones. Damaged
        checkpoints are neither counted nor deleted: counting them is how a fallback used to lose the
        checkpoint it had fallen back to."""
        intact, damaged = [], []
        for path in self.complete_checkpoints():
            (intact if self._known(path) is None else damaged).append(path)
        keep = set(intact[-self.keep_last:]) | {newest} | set(self.pinned())
        resumed = self.resumed_from
        if resumed is not None and not any(p.name > resumed.name for p in intact):
            keep.add(resumed)
        for path in intact:
            if path not in keep:
                shutil.rmtree(path)
        for path in damaged:
            self.log(f"WARNING: checkpoint {path} is damaged ({self._known(path)}): not counted towards "
                     f"train.keep_last and left in place")

    # ---- pinning (divergence) ----------------------------------------------------------------
    def pinned(self) -> list[Path]:
        """Checkpoints that pruning never deletes (pinned.json, kept across launches)."""
        f = self.root / PINNED
        if not f.is_file():
            return []
        try:
            return [self.root / entry["checkpoint"] for entry in json.loads(f.read_text())]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{f}: unreadable ({e}); it lists checkpoints that must not be pruned") from None

    def pin(self, path: Path, reason: str) -> None:
        """Never prune `path` (rank 0 writes; every rank may call)."""
        if self.rank != 0 or path in self.pinned():
            return
        entries = [{"checkpoint": p.name} for p in self.pinned()] + [{"checkpoint": path.name, "reason": reason}]
        atomic_write_bytes(self.root / PINNED, json.dumps(entries, indent=1).encode())

    def newest_intact_before(self, step: int) -> Optional[Path]:
        """The newest intact checkpoint of a step < `step`, or None. Collective: every rank calls it."""
        before = [p for p in self._listed() if int(p.name[5:]) < step and self.problem(p) is None]
        return before[-1] if before else None

    # ---- finding -----------------------------------------------------------------------------
    def complete_checkpoints(self) -> list[Path]:
        """Checkpoint directories with a manifest, oldest first."""
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial")
                and (p / MANIFEST).is_file()]
        return sorted(dirs, key=lambda p: p.name)

    def find_resumable(self) -> Optional[Path]:
        """The checkpoint to resume from: the one `latest` names if intact, else the newest intact one.

        Every rank verifies its share of each candidate and the problems are all-gathered, so every rank
        takes the same decision (and loads the same checkpoint).
        """
        choice = self._choose()
        latest = self.root / LATEST
        if self.rank == 0 and choice and (not latest.is_file() or latest.read_text().strip() != Path(choice).name):
            # `latest` named a damaged or deleted checkpoint: name the one actually used
            atomic_write_bytes(latest, (Path(choice).name + "\n").encode())
        barrier()
        self.resumed_from = Path(choice) if choice else None
        return self.resumed_from

    def _choose(self) -> Optional[str]:
        """Collective: the candidates as rank 0 lists them, each verified by every rank."""
        candidates = [self.root / n for n in self._bcast(self._candidates() if self.rank == 0 else None)]
        damaged = []
        for path in candidates:
            problem = self.problem(path)
            if problem is None:
                if damaged:
                    self.log(f"WARNING: resuming from {path} instead: " + "; ".join(damaged))
                return str(path)
            damaged.append(f"checkpoint {path} is damaged ({problem})")
        if damaged:
            raise CheckpointError("no intact checkpoint to resume from: " + "; ".join(damaged))
        return None

    def _candidates(self) -> list[str]:
        """Complete checkpoints, newest first, the one `latest` names moved to the front."""
        candidates = [p.name for p in reversed(self.complete_checkpoints())]
        latest = self.root / LATEST
        if latest.is_file():
            named = latest.read_text().strip()
            if named in candidates:  # try what `latest` names first
                candidates.remove(named)
                candidates.insert(0, named)
        return candidates

    def load_rng(self, path: Path) -> bool:
        """Restore this rank's RNG states; False when the checkpoint has none for this rank."""
        f = path / "rng" / f"rank_{self.rank:05d}.pt"
        if not f.is_file():
            return False
        set_rng_state(safe_load(f))
        return True


# ---- consolidation (for release export) ------------------------------------------------------
def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a run directory / checkpoints root → its newest intact checkpoint."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = Checkpointer(root, log=lambda s: None)._choose()
    if found is None:
        raise CheckpointError(f"{path}: no checkpoint found (expected step_*/manifest.json under {root})")
    return Path(found)


def consolidated_state_dict(path: Path) -> tuple[dict, "object"]:
    """(full fp32 state dict {parameter name: tensor}, model config) of a training checkpoint, whatever
    engine, ZeRO stage or layout wrote it; runs in one process without the training world."""
    from calm_pretrain.config import model_config_from_dict

    path = resolve_checkpoint(path)
    problem = verify_checkpoint(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} is damaged ({problem})")
    state = read_trainer_state(path)
    config = model_config_from_dict(state["config"]["model"])
    weights = _engine_state_dict(path, config, state)
    return {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, config


def _engine_state_dict(path: Path, config, state: dict) -> dict:
    """The weights in `path`/engine, read as the engine the checkpoint records wrote them."""
    plain = path / "engine" / "engine.pt"
    if engine_kind(path, state) == "torch":
        if not plain.is_file():
            raise CheckpointError(f"{plain}: missing; {path / TRAINER_STATE} says a plain-PyTorch engine wrote "
                                  f"this checkpoint, and engine.pt holds its weights")
        return safe_load(plain)["model"]
    if plain.is_file():
        raise CheckpointError(f"{plain}: a plain-PyTorch engine's file, but {path / TRAINER_STATE} says DeepSpeed "
                              f"wrote this checkpoint: the checkpoint contradicts itself, refusing to guess")
    from calm_pretrain.parallel.universal import deepspeed_state_dict

    saved = ParallelLayout.of_run(state["config"].get("parallel", {}), state["world_size"])
    # DeepSpeed's universal conversion prints its progress ("Converting DeepSpeed checkpoint ...",
    # "*** 1. Extracting ZeRO fragments", progress bars), which a user reading `calm-pretrain eval` or
    # `export` output has no use for: kept, and shown only if the conversion fails.
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            return deepspeed_state_dict(path / "engine", config, pipeline=saved.pipeline > 1)
    except Exception:
        sys.stderr.write(chatter.getvalue())
        raise


def trained_model(path: Path):
    """The model of a training checkpoint (or a run directory's newest one), consolidated from whatever
    engine wrote it, in eval mode."""
    from calm_pretrain.models import build_model

    state, config = consolidated_state_dict(path)
    model = build_model(config)
    model.load_state_dict(state)
    return model.eval()
