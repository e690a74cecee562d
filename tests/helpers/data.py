"""Small datasets written directly (token and latent shards with their manifests, jsonl files) and
corpus slices, for the tests and tools/bench_data.py."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from data_pipeline.manifest import Manifest, ShardEntry, write_done, write_manifest
from data_pipeline.shards import ShardSpec, ShardWriter, token_dtype_for


def write_token_dataset(directory: str | Path, samples: np.ndarray, k: int = 4, shards: int = 1,
                        vocab_size: int = 4096, tokenizer: Optional[dict] = None, layout: str = "lm",
                        rows_per_batch: Optional[int] = None) -> Manifest:
    """Token shards holding exactly `samples` [n, T] (split into `shards` files) and their manifest."""
    directory = Path(directory)
    samples = np.asarray(samples)
    n, t = samples.shape
    spec = ShardSpec("tokens", t, token_dtype_for(vocab_size), k)
    entries = []
    for i, part in enumerate(np.array_split(np.arange(n), shards)):
        path = directory / f"tokens-{i:05d}.arrow"
        with ShardWriter(path, spec, rows_per_batch=rows_per_batch) as w:
            w.add(samples[part])
            info = w.finish()
        entry = ShardEntry(path.name, info.num_samples, info.num_samples * t, info.bytes, info.sha256,
                           {"unit": i, "max_id": int(samples[part].max()) if len(part) else -1})
        write_done(path, entry)
        entries.append(entry)
    tok = tokenizer or {"spec": "test", "type": "test", "fingerprint": "test-tokenizer", "vocab_size": vocab_size,
                        "bos_id": 1, "eos_id": 2, "pad_id": 0}
    m = Manifest(kind="tokens", layout=layout, k=k, seq_chunks=t // k, sample_tokens=t, token_dtype=spec.token_dtype,
                 tokenizer=tok, shards=entries, stats={}, job={"stage": "test"}, complete=True)
    write_manifest(m, directory)
    return m


def corpus_documents(path: str | Path, limit: int, skip: int = 0, field: str = "text") -> Iterator[str]:
    """The first `limit` documents (after `skip`) of a jsonl or jsonl.zst file, streamed."""
    path = Path(path)
    with open(path, "rb") as f:
        if path.suffix == ".zst":
            import zstandard

            stream = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
        else:
            stream = io.TextIOWrapper(f, encoding="utf-8")
        n = 0
        for i, line in enumerate(stream):
            if i < skip:
                continue
            if n >= limit:
                break
            yield json.loads(line)[field]
            n += 1


def write_jsonl(path: str | Path, texts, field: str = "text", compress: bool = False) -> Path:
    path = Path(path)
    data = b"".join(json.dumps({field: t}).encode() + b"\n" for t in texts)
    if compress:
        import zstandard

        data = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)
    path.write_bytes(data)
    return path


def write_latent_dataset(directory: str | Path, ids: np.ndarray, mu: np.ndarray, log_sigma: np.ndarray, k: int = 4,
                         vocab_size: int = 4096, latent_dtype: str = "bf16", ae_fingerprint: str = "test-ae") -> Manifest:
    """Latent shards holding exactly ids [n, L·K] and posteriors mu/log_sigma [n, L, d] (one shard)."""
    directory = Path(directory)
    n, t = ids.shape
    d = mu.shape[-1]
    spec = ShardSpec("latents", t, token_dtype_for(vocab_size), k, d, latent_dtype)
    path = directory / "latents-00000.arrow"
    with ShardWriter(path, spec) as w:
        w.add(ids, mu, log_sigma)
        info = w.finish()
    entry = ShardEntry(path.name, info.num_samples, info.num_samples * t, info.bytes, info.sha256,
                       {"unit": 0, "max_id": int(ids.max()) if ids.size else -1})
    write_done(path, entry)
    tok = {"spec": "test", "type": "test", "fingerprint": "test-tokenizer", "vocab_size": vocab_size,
           "bos_id": 1, "eos_id": 2, "pad_id": 0}
    m = Manifest(kind="latents", layout="lm", k=k, seq_chunks=t // k, sample_tokens=t, token_dtype=spec.token_dtype,
                 tokenizer=tok, shards=[entry], stats={}, job={"stage": "test"}, complete=True,
                 latent={"latent_dim": d, "dtype": latent_dtype, "ae_fingerprint": ae_fingerprint})
    write_manifest(m, directory)
    return m
