"""Checkpoint files hashed in the pass that writes them, and the record of who wrote what.

A checkpoint's manifest holds the size and digest (XXH3-128, ``CHECKPOINT_HASH``; why not SHA-256:
``data_pipeline/files.py``) of every file. Reading the bytes back after the save
to hash them is a second pass over tens of GB; here each rank hashes the bytes of the files it writes
as they go to the file (:class:`HashingWriter`, a file-like object ``torch.save`` writes into; a large
write is hashed on a second thread while it is written, both without the GIL), and records them in the
active :class:`WriteLedger`.

DeepSpeed writes every file of its checkpoints through ``engine.checkpoint_engine.save(state_dict,
path)`` on the rank that owns it; :func:`install_hashing_engine` wraps that engine so its torch.save goes
through a HashingWriter. What DeepSpeed writes otherwise (its recovery scripts, copied by global rank 0)
is claimed with :func:`claim_written`, which hashes the file once after the fact.

An asynchronous save (``train.async_save``) records with a :class:`BackgroundWriter`: hashed_save
then copies the state it is given (:func:`snapshot`: on the host, each storage once) and returns,
and the writer's thread writes and hashes the copy while training goes on. The checkpointer commits
the checkpoint once every rank's writer is done (train/checkpoint.py).
"""
from __future__ import annotations

import collections
import contextlib
import copy
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Optional

import torch

from data_pipeline.files import file_digest, new_hash

CHECKPOINT_HASH = "xxh3_128"  # what new checkpoints' manifests record ("hash"); older ones: sha256

OVERLAP_BYTES = 1 << 20  # writes at least this large are hashed on the helper thread while written
_pool: Optional[ThreadPoolExecutor] = None
_pool_lock = threading.Lock()


def _helper() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt-hash")
        return _pool


class HashingWriter:
    """A write-only file: every byte written to `path` also goes into the checkpoint hash. No ``fileno`` on
    purpose, so that torch.save writes through :meth:`write` instead of to the descriptor."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "wb")
        self._hash = new_hash(CHECKPOINT_HASH)
        self.size = 0

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if n >= OVERLAP_BYTES:  # hashlib and the file write both release the GIL: overlap them
            pending = _helper().submit(self._hash.update, data)
            try:
                self._file.write(data)
            finally:
                pending.result()
        else:
            self._hash.update(data)
            self._file.write(data)
        self.size += n
        return n

    def flush(self) -> None:
        self._file.flush()

    def close(self, durable: bool = False) -> None:
        if durable:
            self._file.flush()
            os.fsync(self._file.fileno())
        self._file.close()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class WriteLedger:
    """The files this process wrote into a checkpoint: {absolute path: (size, digest)}."""

    def __init__(self, background: Optional["BackgroundWriter"] = None):
        self.files: dict[str, tuple[int, str]] = {}
        self.background = background  # where hashed_save queues its copies (None: it writes at once)

    def record(self, path, size: int, digest: str) -> None:
        self.files[str(Path(path).absolute())] = (size, digest)

    def relative_to(self, root: Path) -> dict[str, tuple[int, str]]:
        """{path relative to `root`: (size, digest)} of the recorded files under `root`."""
        root = Path(root).absolute()
        out = {}
        for path, entry in self.files.items():
            p = Path(path)
            if p.is_relative_to(root):
                out[str(p.relative_to(root))] = entry
        return out


_active: list[WriteLedger] = []


@contextlib.contextmanager
def recording(background: Optional["BackgroundWriter"] = None) -> Iterator[WriteLedger]:
    """Within: every hashed_save / claim_written of this process is recorded in the yielded ledger.
    With a `background` writer, hashed_save copies what it is given and returns at once; the writer
    writes it, hashes it and records it (``background.wait()`` says when all of it is on disk)."""
    ledger = WriteLedger(background)
    _active.append(ledger)
    try:
        yield ledger
    finally:
        _active.remove(ledger)


def digest_of(data: bytes) -> str:
    """The checkpoint hash of bytes written by other means (trainer_state.json)."""
    h = new_hash(CHECKPOINT_HASH)
    h.update(data)
    return h.hexdigest()


def _record(ledgers, path, size: int, digest: str) -> None:
    for ledger in ledgers:
        ledger.record(path, size, digest)


def _write_hashed(obj, path, kwargs: dict, ledgers, durable: bool = False) -> tuple[int, str]:
    writer = HashingWriter(Path(path))
    try:
        torch.save(obj, writer, **kwargs)
    finally:
        writer.close(durable)
    _record(ledgers, path, writer.size, writer.hexdigest())
    return writer.size, writer.hexdigest()


def hashed_save(obj, path, **kwargs) -> Optional[tuple[int, str]]:
    """``torch.save(obj, path, **kwargs)``, hashing the bytes as they are written; (size, digest),
    recorded in the active ledger. Under a background recording: a copy of `obj` is queued, None."""
    ledgers = list(_active)
    background = next((ledger.background for ledger in ledgers if ledger.background is not None), None)
    if background is not None:
        background.submit(obj, path, kwargs, ledgers)
        return None
    return _write_hashed(obj, path, kwargs, ledgers)


# ---- writing in the background ---------------------------------------------------------------
def snapshot(obj, storages: Optional[dict] = None, buffers: Optional["HostBuffers"] = None):
    """A copy of `obj` that training may not change: every tensor's storage copied once (views of one
    storage stay views of one copy, so torch.save writes the same records) to host memory (pinned,
    from an accelerator; from `buffers` when given); containers rebuilt, other objects deep-copied
    (small: scalers, enums)."""
    storages = {} if storages is None else storages
    buffers = buffers or HostBuffers()
    if isinstance(obj, torch.Tensor):
        return _snapshot_tensor(obj.detach(), storages, buffers)
    if isinstance(obj, dict):
        out = type(obj)() if type(obj) in (dict, collections.OrderedDict) else copy.copy(obj)
        for k, v in obj.items():
            out[k] = snapshot(v, storages, buffers)
        return out
    if isinstance(obj, (list, tuple)):
        items = [snapshot(v, storages, buffers) for v in obj]
        if type(obj) in (list, tuple):
            return type(obj)(items)
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # a namedtuple: its fields
    return copy.deepcopy(obj)


def _snapshot_tensor(t: torch.Tensor, storages: dict, buffers: "HostBuffers") -> torch.Tensor:
    storage = t.untyped_storage()
    key = (storage.data_ptr(), storage.device, storage.nbytes())
    if key not in storages:
        raw = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
        copied = buffers.take(storage.nbytes(), pinned=storage.device.type != "cpu")
        # from an accelerator: to pinned host memory, asynchronously; BackgroundWriter.start waits once
        copied.copy_(raw, non_blocking=storage.device.type != "cpu")
        storages[key] = copied.untyped_storage()
    out = torch.empty(0, dtype=t.dtype, device="cpu")
    return out.set_(storages[key], t.storage_offset(), t.size(), t.stride())


class HostBuffers:
    """Host memory for snapshots, kept from one background save to the next: the same state has the
    same storage sizes every time, so after the first save no page is allocated (and none pinned,
    which is slow) again. Holds one copy of this rank's checkpoint for the rest of the run."""

    def __init__(self):
        self._free: dict[tuple[int, bool], list[torch.Tensor]] = collections.defaultdict(list)
        self._lent: list[tuple[tuple[int, bool], torch.Tensor]] = []

    def take(self, nbytes: int, pinned: bool) -> torch.Tensor:
        key = (nbytes, pinned)
        buf = self._free[key].pop() if self._free[key] else torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        self._lent.append((key, buf))
        return buf

    def give_back(self) -> None:
        """Everything lent is free again (its files are written)."""
        for key, buf in self._lent:
            self._free[key].append(buf)
        self._lent = []


class BackgroundWriter:
    """Writes one checkpoint's queued snapshots on a thread of its own, in order, once :meth:`start`
    is called (the save's copies are all made: the writer does not compete with them). ``wait``
    returns None when all of them are written and recorded, or what went wrong (the first error)."""

    def __init__(self, buffers: Optional[HostBuffers] = None):
        self.buffers = buffers or HostBuffers()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt-writer")
        self._queued, self._jobs = [], []

    def submit(self, obj, path, kwargs: dict, ledgers) -> None:
        self._queued.append((snapshot(obj, buffers=self.buffers), Path(path), kwargs, ledgers))

    def start(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the copies to pinned memory have landed
        for obj, path, kwargs, ledgers in self._queued:
            # durable: fsynced before the checkpoint is committed (off the step's path here, so it costs
            # training nothing; a synchronous save leaves writeback to the OS, as DeepSpeed's does)
            self._jobs.append((path, self._pool.submit(_write_hashed, obj, path, kwargs, ledgers, True)))
        self._queued = []

    def done(self) -> bool:
        return all(job.done() for _, job in self._jobs)

    def wait(self) -> Optional[str]:
        errors = []
        for path, job in self._jobs:
            try:
                job.result()
            except Exception as e:  # noqa: BLE001 — reported to every rank by the checkpointer, not lost
                errors.append(f"{path}: {type(e).__name__}: {e}")
        self._pool.shutdown()
        self._jobs = []
        self.buffers.give_back()
        return errors[0] if errors else None


def claim_written(path) -> None:
    """Record a file this process wrote by other means (hashed here, once, after the fact)."""
    _record(list(_active), path, os.path.getsize(path), file_digest(path, CHECKPOINT_HASH))


class HashingCheckpointEngine:
    """DeepSpeed's checkpoint engine, with ``save`` hashing what it writes (everything else delegated).
    DeepSpeed's TorchCheckpointEngine is ``torch.save(state_dict, path, _use_new_zipfile_serialization=
    zipfile_serialization)``: the same call here, into a HashingWriter. Another engine (DeepSpeed's
    fast or decoupled writers) saves its own way, and the file is hashed after it returns."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def save(self, state_dict, path: str):
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        if type(self.inner) is TorchCheckpointEngine:
            hashed_save(state_dict, path, _use_new_zipfile_serialization=self.inner.zipfile_serialization)
            return None
        if self.inner.is_decoupled():  # the file is written later, by another process: nothing to hash yet
            raise NotImplementedError("a decoupled checkpoint engine writes after save() returns; checkpoints "
                                      "here are hashed as they are written (see docs/checkpoints.md)")
        result = self.inner.save(state_dict, path)
        claim_written(path)
        return result


def install_hashing_engine(ds_engine) -> None:
    """Make a DeepSpeed engine's checkpoint writes hashed (idempotent)."""
    if not isinstance(ds_engine.checkpoint_engine, HashingCheckpointEngine):
        ds_engine.checkpoint_engine = HashingCheckpointEngine(ds_engine.checkpoint_engine)
