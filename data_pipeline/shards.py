"""The shard file format: Arrow IPC files, zstd-compressed, in small record batches.

One row is one sample of ``T = L·K`` tokens. Columns:

=================  ==========================================  ==============================
column             type                                        in
=================  ==========================================  ==============================
``ids``            fixed_size_list<uint16 | int32>[T]          token and latent shards
``mu``             fixed_size_list<uint16 (bf16 bits)>[L·d]    latent shards, dtype bf16
                   fixed_size_list<int8>[L·d]                  latent shards, dtype int8, int8-ls4
``log_sigma``      as ``mu``                                   latent shards, dtype bf16, int8
                   fixed_size_list<uint8>[ceil(L·d/2)]         int8-ls4: 4-bit codes, two per byte
``mu_scale``       fixed_size_list<float16>[L]                 int8, int8-ls4: one scale per vector
``log_sigma_scale`` as ``mu_scale``                            int8; int8-ls4 (the 4-bit step)
``log_sigma_offset`` as ``mu_scale``                           int8-ls4 only (the 4-bit offset)
``crc``            uint32: CRC32 of the row's stored bytes     all
=================  ==========================================  ==============================

Token ids are uint16 when the vocabulary fits (≤ 65536 ids), int32 otherwise. The 8-bit option stores each
d-dimensional vector as int8 with a symmetric per-vector scale (absmax / 127, float16); ``int8-ls4`` keeps
mu so and stores log_sigma in 4 bits with a per-vector offset and step (data_pipeline/latent_codec.py).

Record batches hold about :data:`TARGET_BATCH_BYTES` of raw data, so reading one sample at random
decompresses little; the file is memory-mapped. Every row carries a CRC32 checked on every read, so a
flipped bit anywhere in the data is an error naming the shard, never a silent wrong sample; ``verify``
also re-hashes whole files against the manifest's sha256.

A shard is written to a temporary name, read back and checked, fsynced and only then renamed, so a
half-written shard never looks finished.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from data_pipeline.errors import ShardError
from data_pipeline.files import fsync_dir, fsync_file, sha256_file, tmp_path_for
from data_pipeline.latent_codec import (  # noqa: F401 - re-exported: the shard format's latent storage
    LATENT_DTYPES,
    bf16_bits_to_f32,
    decode_tensor,
    dequantize_int8,
    encode_tensor,
    f32_to_bf16_bits,
    metadata_columns,
    quantize_int8,
    tensor_columns,
    tensor_row_bytes,
)

FORMAT = "calm-shard"
VERSION = 1
TARGET_BATCH_BYTES = 128 * 1024
ZSTD_LEVEL = 3
TOKEN_DTYPES = {"uint16": np.uint16, "int32": np.int32}


def token_dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "int32"


@dataclass(frozen=True)
class ShardSpec:
    """What every row of a shard looks like."""

    kind: str  # "tokens" | "latents"
    sample_tokens: int  # T = L·K
    token_dtype: str  # "uint16" | "int32"
    k: int
    latent_dim: int = 0
    latent_dtype: str = ""  # one of LATENT_DTYPES (latents only)

    def __post_init__(self):
        if self.kind not in ("tokens", "latents"):
            raise ValueError(f"shard kind must be 'tokens' or 'latents', got {self.kind!r}")
        if self.token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"token dtype must be one of {sorted(TOKEN_DTYPES)}, got {self.token_dtype!r}")
        if self.k < 1 or self.sample_tokens < self.k or self.sample_tokens % self.k:
            raise ValueError(f"tokens per sample {self.sample_tokens} must be a positive multiple of K={self.k}")
        if self.kind == "latents" and (self.latent_dim < 1 or self.latent_dtype not in LATENT_DTYPES):
            raise ValueError(f"latent shards need latent_dim >= 1 and dtype in {LATENT_DTYPES}")

    @property
    def seq_chunks(self) -> int:
        return self.sample_tokens // self.k

    @property
    def is_latent(self) -> bool:
        return self.kind == "latents"

    def row_bytes(self) -> int:
        n = self.sample_tokens * np.dtype(TOKEN_DTYPES[self.token_dtype]).itemsize + 4
        if self.is_latent:
            n += sum(tensor_row_bytes(self.latent_dtype, name, self.seq_chunks, self.latent_dim)
                     for name in ("mu", "log_sigma"))
        return n

    def default_rows_per_batch(self) -> int:
        return max(1, TARGET_BATCH_BYTES // self.row_bytes())

    def schema(self, rows_per_batch: int) -> pa.Schema:
        t = self.sample_tokens
        fields = [pa.field("ids", pa.list_(pa.from_numpy_dtype(TOKEN_DTYPES[self.token_dtype]), t))]
        if self.is_latent:
            fields += [pa.field(c, pa.list_(store, width)) for c, store, width in self._latent_columns()]
        fields.append(pa.field("crc", pa.uint32()))
        meta = {"format": FORMAT, "version": VERSION, "rows_per_batch": rows_per_batch, **asdict(self)}
        return pa.schema(fields, metadata={b"calm": json.dumps(meta).encode()})

    def _latent_columns(self) -> list:
        """(column, type, width) of mu then log_sigma; bf16 and int8 keep their original column order."""
        cols = [c for name in ("mu", "log_sigma")
                for c in tensor_columns(self.latent_dtype, name, self.seq_chunks, self.latent_dim)]
        return sorted(cols, key=lambda c: c[0].endswith(("_scale", "_offset")))  # stable: payloads first

    @classmethod
    def from_schema(cls, schema: pa.Schema, where: str) -> tuple["ShardSpec", int]:
        try:
            meta = json.loads((schema.metadata or {})[b"calm"])
            if not isinstance(meta, dict):
                raise ValueError("not a mapping")
        except (KeyError, ValueError, TypeError):  # JSON and Unicode errors are ValueErrors
            raise ShardError(f"{where}: not a calm shard (no readable 'calm' schema metadata)") from None
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ShardError(f"{where}: shard format {meta.get('format')!r} v{meta.get('version')!r}; "
                             f"this code reads {FORMAT} v{VERSION}")
        try:
            spec = cls(kind=meta["kind"], sample_tokens=int(meta["sample_tokens"]), token_dtype=meta["token_dtype"],
                       k=int(meta["k"]), latent_dim=int(meta.get("latent_dim", 0)),
                       latent_dtype=meta.get("latent_dtype", ""))
            rows = int(meta["rows_per_batch"])
        except (KeyError, ValueError, TypeError) as e:
            raise ShardError(f"{where}: bad shard metadata ({e})") from None
        if spec.schema(rows) != schema:
            raise ShardError(f"{where}: columns do not match the shard's own metadata")
        return spec, rows


# --------------------------------------------------------------------------------------------
# Rows: numpy arrays in their stored form, with a CRC per row
# --------------------------------------------------------------------------------------------
def _stored_columns(spec: ShardSpec) -> list[str]:
    return ["ids"] + ([c for c, _, _ in spec._latent_columns()] if spec.is_latent else [])


def row_crcs(arrays: dict, columns: list[str]) -> np.ndarray:
    n = len(arrays[columns[0]])
    out = np.empty(n, dtype=np.uint32)
    for i in range(n):
        c = 0
        for name in columns:
            c = zlib.crc32(arrays[name][i], c)
        out[i] = c
    return out


def encode_rows(spec: ShardSpec, ids: np.ndarray, mu: Optional[np.ndarray] = None,
                log_sigma: Optional[np.ndarray] = None) -> dict:
    """Samples → stored arrays (one row per sample, 2-D, C-contiguous)."""
    t = spec.sample_tokens
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] != t:
        raise ValueError(f"ids must be [n, {t}], got {list(ids.shape)}")
    info = np.iinfo(TOKEN_DTYPES[spec.token_dtype])
    if ids.size and (ids.min() < 0 or ids.max() > info.max):
        raise ValueError(f"token ids outside [0, {info.max}] for {spec.token_dtype} shards")
    out = {"ids": np.ascontiguousarray(ids, dtype=TOKEN_DTYPES[spec.token_dtype])}
    if spec.is_latent:
        n, want = len(ids), (len(ids), spec.seq_chunks, spec.latent_dim)
        for name, x in (("mu", mu), ("log_sigma", log_sigma)):
            if x is None or tuple(np.shape(x)) != want:
                raise ValueError(f"{name} must be {list(want)}, got {None if x is None else list(np.shape(x))}")
            x = np.asarray(x, dtype=np.float32)
            if not np.isfinite(x).all():
                raise ValueError(f"{name} holds non-finite values (is the autoencoder broken?)")
            out.update(encode_tensor(spec.latent_dtype, name, x))
    elif mu is not None or log_sigma is not None:
        raise ValueError("token shards hold no latents")
    return out


def decode_rows(spec: ShardSpec, stored: dict, rows) -> dict:
    """Stored arrays (a record batch) → selected samples: ids int64 [n, T]; mu, log_sigma float32 [n, L, d]."""
    out = {"ids": stored["ids"][rows].astype(np.int64)}
    if spec.is_latent:
        for name in ("mu", "log_sigma"):
            out[name] = decode_tensor(spec.latent_dtype, name, stored, rows, spec.seq_chunks, spec.latent_dim)
    return out


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
@dataclass
class ShardInfo:
    path: Path
    num_samples: int
    bytes: int
    sha256: str


class ShardWriter:
    """Write samples into one shard; `finish()` verifies and publishes it, leaving the shard context aborts.

        with ShardWriter(path, spec) as w:
            w.add(ids)            # or w.add(ids, mu, log_sigma) for latent shards
            info = w.finish()
    """

    def __init__(self, path: str | os.PathLike, spec: ShardSpec, rows_per_batch: Optional[int] = None):
        self.path = Path(path)
        self.spec = spec
        self.rows_per_batch = int(rows_per_batch or spec.default_rows_per_batch())
        self.columns = _stored_columns(spec)
        self.schema = spec.schema(self.rows_per_batch)
        self.tmp = tmp_path_for(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._sink = pa.OSFile(str(self.tmp), "wb")
        options = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=ZSTD_LEVEL))
        self._writer = pa.ipc.new_file(self._sink, self.schema, options=options)
        self._pending: list[dict] = []
        self._pending_rows = 0
        self.num_samples = 0
        self._closed = False

    def add(self, ids: np.ndarray, mu: Optional[np.ndarray] = None, log_sigma: Optional[np.ndarray] = None) -> None:
        stored = encode_rows(self.spec, ids, mu, log_sigma)
        self._pending.append(stored)
        self._pending_rows += len(stored["ids"])
        self.num_samples += len(stored["ids"])
        r = self.rows_per_batch
        if self._pending_rows >= r:
            joined = self._take_pending()
            full = (len(joined["ids"]) // r) * r
            for start in range(0, full, r):
                self._write({c: a[start:start + r] for c, a in joined.items()})
            if full < len(joined["ids"]):
                self._pending = [{c: a[full:] for c, a in joined.items()}]
                self._pending_rows = len(joined["ids"]) - full

    def _take_pending(self) -> dict:
        parts = self._pending
        joined = parts[0] if len(parts) == 1 else {c: np.concatenate([p[c] for p in parts]) for c in self.columns}
        self._pending, self._pending_rows = [], 0
        return joined

    def _write(self, rows: dict) -> None:
        arrays = []
        for c in self.columns:
            a = np.ascontiguousarray(rows[c])
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1]))
        arrays.append(pa.array(row_crcs(rows, self.columns), type=pa.uint32()))
        self._writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self.schema))

    def finish(self) -> ShardInfo:
        """Close, read back and check every row, fsync, rename to the final name."""
        if self._pending_rows:
            self._write(self._take_pending())
        self._writer.close()
        self._sink.close()
        self._closed = True
        fsync_file(self.tmp)
        reader = ShardReader(self.tmp, num_samples=self.num_samples)
        try:
            for i in range(reader.num_batches):
                reader.read_batch(i)
        finally:
            reader.close()
        size, digest = self.tmp.stat().st_size, sha256_file(self.tmp)
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return ShardInfo(self.path, self.num_samples, size, digest)

    def abort(self) -> None:
        if not self._closed:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - closing a writer that failed half-way
                pass
            self._sink.close()
            self._closed = True
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._closed:
            self.abort()


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
class ShardReader:
    """Random access to the record batches of one shard (memory-mapped); every row's CRC is checked.

    `expected_bytes` (from the manifest) turns a truncated file into a clear error before anything is
    read; `num_samples` lets the reader check the row count without reading the last batch."""

    def __init__(self, path: str | os.PathLike, expected_bytes: Optional[int] = None,
                 num_samples: Optional[int] = None):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise ShardError(f"shard {self.path} does not exist") from None
        if expected_bytes is not None and size != expected_bytes:
            raise ShardError(f"shard {self.path} has {size} bytes, expected {expected_bytes} (truncated or replaced)")
        try:
            self._mmap = pa.memory_map(str(self.path), "r")
            self._reader = pa.ipc.open_file(self._mmap)
            schema = self._reader.schema
        except (pa.ArrowException, OSError, ValueError) as e:
            raise ShardError(f"shard {self.path} is damaged or not an Arrow file ({e})") from None
        self.spec, self.rows_per_batch = ShardSpec.from_schema(schema, str(self.path))
        self.columns = _stored_columns(self.spec)
        self.num_batches = self._reader.num_record_batches
        if num_samples is None:
            last = self.read_batch(self.num_batches - 1)["ids"] if self.num_batches else np.empty((0,))
            num_samples = (self.num_batches - 1) * self.rows_per_batch + len(last) if self.num_batches else 0
        expect_batches = -(-num_samples // self.rows_per_batch)
        if expect_batches != self.num_batches:
            raise ShardError(f"shard {self.path} has {self.num_batches} record batches, {num_samples} samples "
                             f"need {expect_batches} (truncated or wrong manifest)")
        self.num_samples = num_samples

    def batch_rows(self, i: int) -> int:
        return min(self.rows_per_batch, self.num_samples - i * self.rows_per_batch)

    def read_batch(self, i: int) -> dict:
        """Stored arrays of record batch i, each [rows, width], after checking every row's CRC."""
        try:
            batch = self._reader.get_batch(i)
            batch.validate()  # cheap length/offset checks: damaged metadata must not reach Arrow's kernels
            stored = {}
            for c in self.columns:
                col = batch.column(c)
                stored[c] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
            crc = batch.column("crc").to_numpy(zero_copy_only=False)
        except (pa.ArrowException, OSError, ValueError, KeyError) as e:
            raise ShardError(f"shard {self.path}: record batch {i} is damaged ({type(e).__name__}: {e})") from None
        if hasattr(self, "num_samples") and len(crc) != self.batch_rows(i):
            raise ShardError(f"shard {self.path}: record batch {i} has {len(crc)} rows, expected {self.batch_rows(i)}")
        bad = np.nonzero(row_crcs(stored, self.columns) != crc)[0]
        if len(bad):
            row = i * self.rows_per_batch + int(bad[0])
            raise ShardError(f"shard {self.path}: checksum mismatch in sample {row} (record batch {i}); "
                             f"the file is corrupted — run `calm-data verify` and re-make it")
        meta = metadata_columns(self.spec.latent_dtype, self.spec.seq_chunks, self.spec.latent_dim)
        for c in meta if self.spec.is_latent else []:
            bad = np.nonzero(~np.isfinite(stored[c]).all(axis=1))[0]
            if len(bad):  # the writer never stores one: a file made elsewhere, with matching checksums
                raise ShardError(f"shard {self.path}: non-finite {c} in sample {i * self.rows_per_batch + int(bad[0])} "
                                 f"(record batch {i}); not written by this code — re-make it")
        return stored

    def read_samples(self, rows) -> dict:
        """Decoded samples at the given row indices (any order)."""
        rows = np.asarray(rows, dtype=np.int64)
        parts, order = [], []
        for b in np.unique(rows // self.rows_per_batch):
            sel = np.nonzero(rows // self.rows_per_batch == b)[0]
            parts.append(decode_rows(self.spec, self.read_batch(int(b)), rows[sel] - b * self.rows_per_batch))
            order.append(sel)
        if not parts:
            return decode_rows(self.spec, {c: np.empty((0, 1)) for c in self.columns}, slice(0, 0))
        inv = np.argsort(np.concatenate(order), kind="stable")
        return {k: np.concatenate([p[k] for p in parts])[inv] for k in parts[0]}

    def close(self) -> None:
        self._reader = None
        if getattr(self, "_mmap", None) is not None:
            self._mmap.close()
            self._mmap = None

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def verify_shard(path: Path, expected_bytes: Optional[int] = None, expected_sha256: Optional[str] = None,
                 expected_samples: Optional[int] = None) -> Optional[str]:
    """Re-check one shard completely; returns a description of the damage, or None if it is intact."""
    try:
        if expected_bytes is not None or expected_sha256 is not None:
            if not path.is_file():
                return "missing"
            size = path.stat().st_size
            if expected_bytes is not None and size != expected_bytes:
                return f"size {size} bytes, expected {expected_bytes} (truncated or replaced)"
            if expected_sha256 is not None and sha256_file(path) != expected_sha256:
                return "sha256 mismatch (contents changed)"
        with ShardReader(path, num_samples=expected_samples) as r:
            for i in range(r.num_batches):
                r.read_batch(i)
    except ShardError as e:
        return str(e)
    return None
