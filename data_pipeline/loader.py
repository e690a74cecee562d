"""The training data loader: deterministic order, world-size-independent batches, blending, prefetch.

Order. Each dataset's sample order in epoch e is a pseudo-random permutation of its sample indices
keyed by (seed, dataset index, e): a Feistel network on the index bits with cycle-walking, so any
position maps to its sample in O(1) time and memory however large the dataset (no index to build or
cache). Epochs follow each other without a gap: a global batch may end one epoch and begin the next,
and every sample appears exactly once per epoch.

Blending. Several datasets with weights w_i form one stream: position p takes the next sample of the
dataset with the largest deficit w_i·(p+1) − c_i (c_i = samples drawn from it so far; ties go to the
first). This is deterministic, needs no random numbers and keeps every prefix within one sample of
the target mixture; each dataset walks through its own epochs.

Batches. Global batch b is stream positions [b·G, (b+1)·G) whatever the data-parallel world size W:
DP rank r takes the contiguous slice [r·G/W, (r+1)·G/W) and reads only those samples, yielding them as
micro-batches of ``micro_batch_size`` (gradient accumulation). The state is the per-dataset draw counts
at the start of the current global batch plus the micro-step inside it; it is identical on every rank,
so rank 0 can save it, and a run resumes on any W at a global-batch boundary (mid-batch only with the
same W and micro-batch size).

Reading. Shards are memory-mapped; decoded record batches sit in a small LRU cache and open files in
an LRU of bounded size, so memory stays bounded however large the data. A background thread prepares
the next ``prefetch`` micro-batches. Every row's CRC32 is checked on read (see shards.py).

Batches are dicts of CPU tensors: ``ids`` int64 [b, L·K]; for latent shards also ``mu`` and
``log_sigma`` float32 [b, L, d] (upcast from the stored dtype). With ``return_index=True`` also ``dataset``,
``index`` (sample index in its dataset) and ``epoch`` (that dataset's epoch), int64 [b].
"""
from __future__ import annotations

import os
import queue
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from data_pipeline.errors import DataError, ManifestError
from data_pipeline.files import canonical_hash
from data_pipeline.manifest import (Manifest, check_compatible, check_same_kind, check_shard_schema,
                                    load_manifest)
from data_pipeline.shards import ShardReader, decode_rows

STATE_VERSION = 1
_M64 = (1 << 64) - 1


# --------------------------------------------------------------------------------------------
# A keyed pseudo-random permutation of [0, n)
# --------------------------------------------------------------------------------------------
def _splitmix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _mix(x: np.ndarray, key: int) -> np.ndarray:
    z = x ^ np.uint64(key)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def permute(positions: np.ndarray, n: int, key: int, rounds: int = 6) -> np.ndarray:
    """The images of `positions` under a bijection of [0, n) chosen by `key`."""
    positions = np.asarray(positions, dtype=np.uint64)
    if n <= 0:
        raise ValueError("permutation of an empty range")
    if positions.size and int(positions.max()) >= n:
        raise ValueError("position outside [0, n)")
    half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = [_splitmix(key * 1000003 + r) for r in range(rounds)]

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right, k) & mask)
        return (left << np.uint64(half)) | right

    with np.errstate(over="ignore"):
        y = feistel(positions)
        bad = y >= np.uint64(n)
        while bad.any():  # cycle-walking: the domain is at most 4n, so a few rounds at most on average
            y[bad] = feistel(y[bad])
            bad = y >= np.uint64(n)
    return y.astype(np.int64)


def epoch_key(seed: int, dataset: int, epoch: int) -> int:
    return _splitmix(_splitmix(_splitmix(seed & _M64) ^ dataset) ^ epoch)


# --------------------------------------------------------------------------------------------
# Reading samples of one dataset
# --------------------------------------------------------------------------------------------
class _Dataset:
    def __init__(self, manifest: Manifest):
        self.m = manifest
        counts = np.array([s.num_samples for s in manifest.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.n = int(self.starts[-1])

    def locate(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        return shard, idx - self.starts[shard]


class _SampleReader:
    """Reads samples by (dataset, index) through LRU caches of open shards and decoded record batches."""

    def __init__(self, datasets: list[_Dataset], cache_bytes: int, max_open: int):
        self.datasets = datasets
        self.cache_bytes, self.max_open = cache_bytes, max_open
        self._open: OrderedDict = OrderedDict()
        self._batches: OrderedDict = OrderedDict()
        self._cached = 0

    def _reader(self, ds: int, shard: int) -> ShardReader:
        key = (ds, shard)
        r = self._open.get(key)
        if r is None:
            m = self.datasets[ds].m
            entry = m.shards[shard]
            r = ShardReader(m.shard_path(entry), expected_bytes=entry.bytes, num_samples=entry.num_samples)
            try:
                check_shard_schema(m, r.spec, r.path)
            except DataError:
                r.close()
                raise
            self._open[key] = r
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)[1].close()
        else:
            self._open.move_to_end(key)
        return r

    def _batch(self, reader: ShardReader, ds: int, shard: int, b: int) -> dict:
        key = (ds, shard, b)
        stored = self._batches.get(key)
        if stored is None:
            stored = reader.read_batch(b)
            self._batches[key] = stored
            self._cached += sum(a.nbytes for a in stored.values())
            while self._cached > self.cache_bytes and len(self._batches) > 1:
                _, old = self._batches.popitem(last=False)
                self._cached -= sum(a.nbytes for a in old.values())
        else:
            self._batches.move_to_end(key)
        return stored

    def read(self, ds_idx: np.ndarray, sample_idx: np.ndarray) -> dict:
        """Decoded samples, in the order given."""
        n = len(ds_idx)
        out: dict = {}
        for ds in np.unique(ds_idx).tolist():
            sel = np.nonzero(ds_idx == ds)[0]
            shards, rows = self.datasets[ds].locate(sample_idx[sel])
            for shard in np.unique(shards).tolist():
                reader = self._reader(ds, shard)
                in_shard = shards == shard
                batch_of, row_in = np.divmod(rows[in_shard], reader.rows_per_batch)
                targets = sel[in_shard]
                for b in np.unique(batch_of).tolist():
                    at = batch_of == b
                    got = decode_rows(reader.spec, self._batch(reader, ds, shard, b), row_in[at])
                    for k, v in got.items():
                        if k not in out:
                            out[k] = np.empty((n,) + v.shape[1:], dtype=v.dtype)
                        out[k][targets[at]] = v
        return out

    def close(self) -> None:
        for r in self._open.values():
            r.close()
        self._open.clear()
        self._batches.clear()
        self._cached = 0


def _check_first_shard(m: Manifest) -> None:
    """The manifest describes its shards (one file opened at start-up; every shard is checked when opened)."""
    if m.shards:
        entry = m.shards[0]
        with ShardReader(m.shard_path(entry), expected_bytes=entry.bytes, num_samples=entry.num_samples) as r:
            check_shard_schema(m, r.spec, r.path)


# --------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------
class ShardLoader:
    """Iterate micro-batches of token or latent shards for one data-parallel rank.

    Args:
        paths: one shard directory (or manifest file) or a list of them (blended).
        weights: blend weights, one per path (normalised; default equal).
        global_batch_size: samples per optimizer step over all DP ranks (G); fixed across world sizes.
        micro_batch_size: samples per yielded batch (default G / dp_world_size, no accumulation).
        dp_rank, dp_world_size: this rank's place in the data-parallel group.
        seed: picks the permutation of every epoch.
        prefetch: micro-batches prepared ahead by the background thread (0 = read in the caller).
        expect: checked against every manifest with `check_compatible` (k, latent_dim, ae_fingerprint,
            tokenizer_fingerprint, sample_tokens, vocab_size).
        cache_mb, max_open_files: bounds of the read caches.
        return_index: also yield ``dataset``, ``index`` and ``epoch`` of every sample.
        pin_memory: pin batches (when CUDA is available) for faster host-to-device copies.

    Iteration never ends (epochs follow each other); `state_dict()` describes the position after the last
    batch yielded, and `load_state_dict()` resumes from it exactly.
    """

    def __init__(self, paths, weights: Optional[Sequence[float]] = None, *, global_batch_size: int,
                 micro_batch_size: Optional[int] = None, dp_rank: int = 0, dp_world_size: int = 1, seed: int = 0,
                 prefetch: int = 4, expect: Optional[dict] = None, cache_mb: float = 64, max_open_files: int = 64,
                 return_index: bool = False, pin_memory: bool = False):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = [Path(p) for p in paths]
        if not paths:
            raise DataError("no datasets given")
        if weights is None or len(weights) == 0:
            weights = [1.0] * len(paths)
        if len(weights) != len(paths):
            raise DataError(f"{len(weights)} blend weights for {len(paths)} datasets")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
            raise DataError(f"blend weights must be finite, >= 0 and not all zero, got {list(weights)}")
        self.weights = (w / w.sum()).tolist()
        if dp_world_size < 1 or not 0 <= dp_rank < dp_world_size:
            raise DataError(f"bad dp_rank {dp_rank} / dp_world_size {dp_world_size}")
        if global_batch_size < 1 or global_batch_size % dp_world_size:
            raise DataError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                            f"dp_world_size {dp_world_size}")
        per_rank = global_batch_size // dp_world_size
        micro_batch_size = micro_batch_size or per_rank
        if per_rank % micro_batch_size:
            raise DataError(f"micro_batch_size {micro_batch_size} must divide the per-rank batch {per_rank} "
                            f"(global {global_batch_size} / world {dp_world_size})")
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.micro_steps = per_rank // micro_batch_size
        self.seed = int(seed)
        self.prefetch = int(prefetch)
        self.return_index = return_index
        self.pin_memory = pin_memory and torch.cuda.is_available()

        manifests = [load_manifest(p) for p in paths]
        for m in manifests:
            _check_first_shard(m)  # before the run's expectations: an edited manifest would mislead them
            if expect:
                check_compatible(m, **expect)
            if m.num_samples == 0:
                raise ManifestError(f"{m.path}: holds no samples")
        check_same_kind(manifests)
        self.manifests = manifests
        self.kind = manifests[0].kind
        self._datasets = [_Dataset(m) for m in manifests]
        self.sizes = [d.n for d in self._datasets]
        self.data_fingerprint = canonical_hash({"manifests": [m.fingerprint() for m in manifests],
                                                "weights": [round(x, 12) for x in self.weights]})
        self._reader = _SampleReader(self._datasets, int(cache_mb * 2**20), max_open_files)
        self._counts = [0] * len(paths)  # draws per dataset at the start of the current global batch
        self._micro = 0  # micro-steps of the current global batch already yielded
        self._thread: Optional[threading.Thread] = None
        self._queue: Optional[queue.Queue] = None
        self._stop = threading.Event()

    @property
    def data_sources(self) -> dict:
        """What made the shards (the same for every blended dataset, check_same_kind): the tokenizer's and,
        for latents, the autoencoder's fingerprint. Checkpoints record it, so that a release is refused an
        autoencoder or tokenizer the model was not trained with."""
        m = self.manifests[0]
        return {"kind": m.kind, "tokenizer_fingerprint": m.tokenizer_fingerprint,
                "tokenizer_spec": m.tokenizer.get("spec"), "ae_fingerprint": m.ae_fingerprint, "k": m.k,
                "latent_dim": m.latent_dim}

    # ---- position --------------------------------------------------------------------------
    @property
    def consumed_samples(self) -> int:
        """Samples consumed by all DP ranks together (the global stream position)."""
        return sum(self._counts) + self._micro * self.micro_batch_size * self.dp_world_size

    @property
    def epochs(self) -> list[int]:
        """Per dataset, the epoch the current global batch starts in."""
        return [c // n for c, n in zip(self._counts, self.sizes)]

    @property
    def epoch(self) -> int:
        """The epoch (the least-advanced dataset's, when blending) the current global batch starts in."""
        return min(self.epochs)

    @property
    def samples_per_epoch(self) -> int:
        return sum(self.sizes)

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "seed": self.seed, "data_fingerprint": self.data_fingerprint,
                "global_batch_size": self.global_batch_size, "micro_batch_size": self.micro_batch_size,
                "dp_world_size": self.dp_world_size, "counts": list(self._counts), "micro_step": self._micro,
                "consumed_samples": self.consumed_samples, "epoch": self.epoch}

    def load_state_dict(self, state: dict, allow_data_change: bool = False) -> None:
        """Resume from `state_dict()` (of any rank, any world size at a global-batch boundary)."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')!r}; this code reads {STATE_VERSION}")
        if state["data_fingerprint"] != self.data_fingerprint and not allow_data_change:
            raise DataError(f"the data changed since this state was saved (fingerprint {state['data_fingerprint']}"
                            f", now {self.data_fingerprint}: other shards or blend weights)")
        if state["seed"] != self.seed:
            raise DataError(f"loader state has seed {state['seed']}, the loader has {self.seed}")
        counts = [int(c) for c in state["counts"]]
        if len(counts) != len(self._datasets):
            raise DataError(f"loader state has {len(counts)} datasets, the loader has {len(self._datasets)}")
        micro = int(state["micro_step"])
        if micro and (state["global_batch_size"], state["micro_batch_size"], state["dp_world_size"]) != (
                self.global_batch_size, self.micro_batch_size, self.dp_world_size):
            raise DataError("cannot resume in the middle of a global batch with another global batch size, "
                            "micro-batch size or DP world size; save at an optimizer-step boundary")
        self._shutdown()
        self._counts, self._micro = counts, micro

    # ---- the stream --------------------------------------------------------------------------
    def plan_global_batch(self, counts: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
        """(dataset, index, epoch) of each of the G samples of the global batch starting at `counts`,
        and the counts after it."""
        g = self.global_batch_size
        counts = list(counts)
        if len(self._datasets) == 1:
            ds = np.zeros(g, dtype=np.int64)
            draws = counts[0] + np.arange(g, dtype=np.int64)
            after = [counts[0] + g]
        else:
            w = np.asarray(self.weights)
            c = np.asarray(counts, dtype=np.float64)
            ds = np.empty(g, dtype=np.int64)
            draws = np.empty(g, dtype=np.int64)
            p = int(sum(counts))
            for t in range(g):
                i = int(np.argmax(w * (p + t + 1) - c))
                ds[t], draws[t] = i, int(c[i])
                c[i] += 1
            after = [int(x) for x in c]
        index = np.empty(g, dtype=np.int64)
        epoch = np.empty(g, dtype=np.int64)
        for i in np.unique(ds):
            sel = ds == i
            n = self.sizes[i]
            ep, pos = np.divmod(draws[sel], n)
            out = np.empty(len(pos), dtype=np.int64)
            for e in np.unique(ep):
                at = ep == e
                out[at] = permute(pos[at], n, epoch_key(self.seed, int(i), int(e)))
            index[sel], epoch[sel] = out, ep
        return ds, index, epoch, after

    def _micro_batches(self, counts: list[int], micro: int):
        """Yield (batch, state after it) from a position onwards, forever."""
        per_rank = self.global_batch_size // self.dp_world_size
        while True:
            ds, index, epoch, after = self.plan_global_batch(counts)
            lo = self.dp_rank * per_rank
            for j in range(micro, self.micro_steps):
                s = slice(lo + j * self.micro_batch_size, lo + (j + 1) * self.micro_batch_size)
                batch = self._to_tensors(self._reader.read(ds[s], index[s]), ds[s], index[s], epoch[s])
                done = j + 1 == self.micro_steps
                yield batch, ((after if done else counts), (0 if done else j + 1))
            counts, micro = after, 0

    def describe_sample(self, dataset: int, index: int) -> str:
        """Where sample `index` of blended dataset `dataset` lives: shard file and row, for messages."""
        d = self._datasets[dataset]
        shard, row = d.locate(np.array([index]))
        return f"sample {index} of {d.m.path} (shard {d.m.shard_path(d.m.shards[int(shard[0])])}, row {int(row[0])})"

    def _to_tensors(self, arrays: dict, ds, index, epoch) -> dict:
        out = {k: torch.from_numpy(v) for k, v in arrays.items()}
        if self.return_index:
            out.update(dataset=torch.from_numpy(ds.copy()), index=torch.from_numpy(index.copy()),
                       epoch=torch.from_numpy(epoch.copy()))
        if self.pin_memory:
            out = {k: v.pin_memory() for k, v in out.items()}
        return out

    def __iter__(self) -> "ShardLoader":
        return self

    def __next__(self) -> dict:
        if self.prefetch <= 0:
            if self._queue is None:
                self._gen = self._micro_batches(list(self._counts), self._micro)
                self._queue = queue.Queue()  # marks "started"
            batch, (counts, micro) = next(self._gen)
        else:
            if self._thread is None:
                self._start()
            item = self._get()
            if isinstance(item, BaseException):
                self._shutdown()
                raise item
            batch, (counts, micro) = item
        self._counts, self._micro = list(counts), micro
        return batch

    # ---- background prefetch --------------------------------------------------------------------
    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        stop, q = self._stop, self._queue
        start = (list(self._counts), self._micro)

        def work():
            try:
                for item in self._micro_batches(*start):
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, who raises it
                while not stop.is_set():
                    try:
                        q.put(e, timeout=0.1)
                        return
                    except queue.Full:
                        continue

        self._thread = threading.Thread(target=work, name="calm-data-prefetch", daemon=True)
        self._thread.start()

    def _get(self):
        while True:
            try:
                return self._queue.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    return DataError("the prefetch thread stopped without a batch or an error")

    def _shutdown(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread = None
        self._queue = None
        self._gen = None

    def close(self) -> None:
        self._shutdown()
        self._reader.close()

    def __enter__(self) -> "ShardLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self._shutdown()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
