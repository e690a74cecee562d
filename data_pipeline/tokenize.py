"""Documents → token shards, with many worker processes; re-running finishes an interrupted job.

Layouts (samples are always ``T = L·K`` tokens):

- ``lm``: documents joined with a separator (EOS by default, ``separator="none"`` for none, optional BOS
  before each document) and cut into blocks of T tokens; the tail of each shard that does not fill a
  block is dropped and counted (``dropped_tokens``).
- ``ae``: each document + EOS, padded with PAD to a multiple of K (as the reference autoencoder trains),
  concatenated and cut into blocks of T; a chunk of K tokens therefore never straddles two documents.
  The last block of a shard is padded with PAD to T (``pad_tokens`` counts all padding).

Work is cut into *units* deterministically from the input: a unit is the next run of documents holding
at least ``shard_text_mb`` MB of text (the last may hold less). One unit becomes one shard
(``tokens-00000.arrow``, ...), so shard sizes are bounded by the text per unit (~0.3–0.8 bytes of shard
per byte of text). The main process reads the input (through HF ``datasets``) and cuts units; worker
processes tokenize, pack and write shards (temporary name, read back, fsync, rename, then a ``.done``
record). A re-run reads the input again to find the same units, skips every unit whose shard is
finished and verified (size + sha256), and writes ``manifest.json`` when all are. A re-run with other
parameters (tokenizer, layout, K, L, inputs, ...) is refused.

Documents longer than :data:`SEGMENT_CHARS` are tokenized in pieces cut just before a space that follows
a non-space character, where the Llama-3 and GPT-2 pre-tokenizers always split anyway, so the ids are
those of the whole document (a piece without such a space is cut hard), and the pieces are encoded a
batch at a time, so the memory a document takes is its ids, whatever its length. (The published pipeline
splits documents over 10k words into separate documents instead; ours keep their ids and context.)
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing as mp
import os
import queue as queue_mod
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.files import remove_stale_tmp
from data_pipeline.manifest import (
    DONE_SUFFIX,
    Manifest,
    ShardEntry,
    claim_job,
    finished_shards,
    read_done,
    write_done,
    write_manifest,
)
from data_pipeline.shards import ShardSpec, ShardWriter, token_dtype_for
from data_pipeline.sources import SourceStats, iter_documents, resolve_inputs
from data_pipeline.tokenizers import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

SEGMENT_CHARS = 100_000
ENCODE_BATCH_CHARS = 1 << 18  # text per encode_batch call: bounds the tokenizer's per-token bookkeeping


@dataclass
class TokenizeConfig:
    inputs: list
    output: str
    tokenizer: str = "demo"
    layout: str = "lm"  # lm | ae
    k: int = 4
    seq_chunks: int = 512  # L
    text_field: str = "text"
    split: str = "train"  # hub datasets
    subset: Optional[str] = None  # hub dataset configuration
    text_unit: str = "document"  # plain text files: document | paragraph | line
    separator: str = "eos"  # lm layout: eos | none
    add_bos: bool = False  # lm layout: BOS before each document
    shard_text_mb: float = 32.0
    max_documents: Optional[int] = None  # stop after this many documents (slices, experiments)
    workers: int = 1  # 0 = tokenize in this process
    progress: bool = True

    def validate(self) -> None:
        if self.layout not in ("lm", "ae"):
            raise DataError(f"layout must be 'lm' or 'ae', got {self.layout!r}")
        if self.separator not in ("eos", "none"):
            raise DataError(f"separator must be 'eos' or 'none', got {self.separator!r}")
        if self.k < 1 or self.seq_chunks < 1:
            raise DataError(f"K and L must be >= 1 (got K={self.k}, L={self.seq_chunks})")
        if self.shard_text_mb <= 0:
            raise DataError("shard_text_mb must be > 0")
        if self.workers < 0:
            raise DataError("workers must be >= 0")

    @property
    def sample_tokens(self) -> int:
        return self.k * self.seq_chunks


# --------------------------------------------------------------------------------------------
# Pure pieces: long-text splitting and packing
# --------------------------------------------------------------------------------------------
def split_long_text(text: str, max_chars: int = SEGMENT_CHARS) -> list[str]:
    """Cut `text` into pieces of at most `max_chars`, each cut just before a space preceded by a non-space."""
    if len(text) <= max_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > max_chars:
        hi, lo = start + max_chars, start + max_chars // 2
        cut = text.rfind(" ", lo, hi + 1)
        while cut > lo and text[cut - 1].isspace():
            cut = text.rfind(" ", lo, cut)
        if cut <= lo:
            cut = hi  # no clean place: a hard cut (ids may differ from the unsplit text right here)
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _as_array(ids) -> np.ndarray:
    return ids if isinstance(ids, np.ndarray) else np.asarray(ids, dtype=np.int64)


def pack_lm(docs: Sequence[Sequence[int]], sample_tokens: int, sep_id: Optional[int],
            bos_id: Optional[int] = None) -> tuple[np.ndarray, int]:
    """Join documents (BOS? doc SEP?) into one stream, cut into [n, T]; returns (samples, dropped tokens)."""
    bos = np.array([bos_id], dtype=np.int64) if bos_id is not None else None
    sep = np.array([sep_id], dtype=np.int64) if sep_id is not None else None
    parts = []
    for ids in docs:
        if bos is not None:
            parts.append(bos)
        parts.append(_as_array(ids))
        if sep is not None:
            parts.append(sep)
    stream = np.concatenate(parts).astype(np.int64, copy=False) if parts else np.zeros(0, dtype=np.int64)
    n = len(stream) // sample_tokens
    return stream[: n * sample_tokens].reshape(n, sample_tokens), len(stream) - n * sample_tokens


def pack_ae(docs: Sequence[Sequence[int]], sample_tokens: int, k: int, eos_id: int, pad_id: int) -> tuple[np.ndarray, int]:
    """Each document + EOS padded to a multiple of K, concatenated, cut into [n, T] (last block padded);
    returns (samples, pad tokens)."""
    eos = np.array([eos_id], dtype=np.int64)
    parts, pads, length = [], 0, 0
    for ids in docs:
        ids = _as_array(ids)
        fill = -(len(ids) + 1) % k
        parts += [ids, eos, np.full(fill, pad_id, dtype=np.int64)]
        pads += fill
        length += len(ids) + 1 + fill
    fill = -length % sample_tokens
    parts.append(np.full(fill, pad_id, dtype=np.int64))
    stream = np.concatenate(parts).astype(np.int64, copy=False)
    return stream.reshape(-1, sample_tokens), pads + fill


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------
_worker: dict = {}


def init_worker(tokenizer: Tokenizer, progress_queue, parent_pid: Optional[int] = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # parallelism comes from the processes
    _worker["tokenizer"] = tokenizer
    _worker["queue"] = progress_queue
    if parent_pid is not None:
        threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True, name="watch-parent").start()


def _exit_with_parent(parent_pid: int, interval: float = 0.5) -> None:
    """End this worker once the job's main process is gone (kill -9, OOM killer, a lost Slurm step): the
    pool's queues never close then, so a worker would otherwise wait, or go on writing, forever. What
    it was writing is a temporary file, which the next run removes."""
    while True:
        time.sleep(interval)
        if os.getppid() != parent_pid:
            os._exit(1)


def _report(n: int) -> None:
    q = _worker.get("queue")
    if q is not None and n:
        try:
            q.put_nowait(n)
        except Exception:  # noqa: BLE001 - progress is best effort
            pass


def tokenize_documents(tok: Tokenizer, texts: Sequence[str]) -> Iterator[np.ndarray]:
    """Token ids (int32 arrays) of each text, in order.

    Texts go to the tokenizer in batches of about ENCODE_BATCH_CHARS, and a long text in pieces of at most
    SEGMENT_CHARS (``split_long_text``) spread over as many batches as it needs: the tokenizer's per-token
    bookkeeping (an ``Encoding`` costs ~70 bytes a token) then never exists for more than one batch, and a
    20 MB single-line document costs its ids (4 bytes a token), not 40-60 bytes per byte of text."""
    pieces: dict[int, list[np.ndarray]] = {}  # document → its encoded pieces so far
    batch: list[str] = []
    owners: list[int] = []  # the document of each text in `batch`

    def flush() -> None:
        ids = tok.encode_batch(batch) if batch else []
        for owner, piece in zip(owners, ids):
            pieces.setdefault(owner, []).append(np.asarray(piece, dtype=np.int32))
        _report(sum(map(len, ids)))
        batch.clear()
        owners.clear()

    def finished(before: float) -> Iterator[np.ndarray]:
        for d in sorted(k for k in pieces if k < before):
            parts = pieces.pop(d)
            yield parts[0] if len(parts) == 1 else np.concatenate(parts)

    size = 0
    for d, text in enumerate(texts):
        for piece in split_long_text(text):
            batch.append(piece)
            owners.append(d)
            size += len(piece)
            if size >= ENCODE_BATCH_CHARS:
                flush()
                size = 0
                yield from finished(d)  # every document before this one is complete
    flush()
    yield from finished(float("inf"))


def shard_name(unit: int) -> str:
    return f"tokens-{unit:05d}.arrow"


def tokenize_unit(unit: int, texts: list[str], out_dir: str, layout: dict) -> dict:
    """Tokenize, pack and write one shard; returns its ShardEntry as a dict."""
    tok: Tokenizer = _worker["tokenizer"]
    docs = list(tokenize_documents(tok, texts))
    t = layout["sample_tokens"]
    if layout["layout"] == "lm":
        samples, dropped = pack_lm(docs, t, layout["sep_id"], layout["bos_id"])
        extra = {"dropped_tokens": dropped, "pad_tokens": 0}
    else:
        samples, pads = pack_ae(docs, t, layout["k"], layout["eos_id"], layout["pad_id"])
        extra = {"dropped_tokens": 0, "pad_tokens": pads}
    if samples.size and samples.max() >= tok.vocab_size:
        raise DataError(f"tokenizer produced id {samples.max()} >= vocab_size {tok.vocab_size}")
    spec = ShardSpec("tokens", t, layout["token_dtype"], layout["k"])
    path = Path(out_dir) / shard_name(unit)
    with ShardWriter(path, spec) as w:
        w.add(samples)
        info = w.finish()
    stats = {"unit": unit, "documents": len(texts), "text_bytes": sum(len(x.encode("utf-8")) for x in texts),
             "document_tokens": sum(map(len, docs)), "max_id": int(samples.max()) if samples.size else -1, **extra}
    entry = ShardEntry(file=path.name, num_samples=info.num_samples, num_tokens=info.num_samples * t,
                       bytes=info.bytes, sha256=info.sha256, stats=stats)
    write_done(path, entry)
    return asdict(entry)


# --------------------------------------------------------------------------------------------
# Main side
# --------------------------------------------------------------------------------------------
def _units(texts: Iterator[str], unit_bytes: int, max_documents: Optional[int]) -> Iterator[list[str]]:
    unit: list[str] = []
    size = 0
    for i, text in enumerate(texts):
        if max_documents is not None and i >= max_documents:
            break
        unit.append(text)
        size += len(text.encode("utf-8"))
        if size >= unit_bytes:
            yield unit
            unit, size = [], 0
    if unit:
        yield unit


def layout_params(cfg: TokenizeConfig, tok: Tokenizer) -> dict:
    if cfg.layout == "ae":
        missing = [n for n, v in (("EOS", tok.eos_id), ("PAD", tok.pad_id)) if v is None]
        if missing:
            raise DataError(f"tokenizer {tok.spec!r} has no {' or '.join(missing)} token, which the ae layout needs")
    if cfg.layout == "lm" and cfg.separator == "eos" and tok.eos_id is None:
        raise DataError(f"tokenizer {tok.spec!r} has no EOS token; use separator 'none'")
    if cfg.add_bos and tok.bos_id is None:
        raise DataError(f"tokenizer {tok.spec!r} has no BOS token")
    return {"layout": cfg.layout, "k": cfg.k, "sample_tokens": cfg.sample_tokens,
            "token_dtype": token_dtype_for(tok.vocab_size), "eos_id": tok.eos_id, "pad_id": tok.pad_id,
            "sep_id": tok.eos_id if cfg.separator == "eos" else None,
            "bos_id": tok.bos_id if cfg.add_bos else None}


def run_tokenize(cfg: TokenizeConfig, tokenizer: Optional[Tokenizer] = None) -> Manifest:
    """Run (or finish) a tokenize job; returns the complete manifest."""
    cfg.validate()
    tok = tokenizer or load_tokenizer(cfg.tokenizer)
    layout = layout_params(cfg, tok)
    sources = resolve_inputs(list(cfg.inputs))
    out = Path(cfg.output)
    job = {"stage": "tokenize", "sources": [s.describe() for s in sources], "tokenizer": tok.describe(),
           **{k: v for k, v in asdict(cfg).items() if k not in ("inputs", "output", "workers", "progress", "tokenizer")},
           "layout_ids": layout}
    claim_job(out, job)
    remove_stale_tmp(out)

    existing = sorted({p.with_name(p.name[: -len(DONE_SUFFIX)]) if p.name.endswith(DONE_SUFFIX) else p
                       for p in out.glob("tokens-*.arrow*")})
    finished = {int(p.name.split("-")[1].split(".")[0]): e
                for p, e in finished_shards(existing, progress=cfg.progress).items()}
    if existing:
        log.info(f"{out}: {len(finished)} finished shards kept, {len(existing) - len(finished)} to redo")

    src_stats = SourceStats()
    texts = iter_documents(sources, cfg.text_field, cfg.split, cfg.text_unit, cfg.subset, src_stats)
    units = _units(texts, int(cfg.shard_text_mb * 1e6), cfg.max_documents)
    bar = _progress_bar(cfg.progress)
    n_units = _drive(units, finished, tok, layout, out, cfg.workers, bar)
    if bar is not None:
        bar.close()

    entries = []
    for unit in range(n_units):
        entry = read_done(out / shard_name(unit), verify=False)
        if entry is None:
            raise DataError(f"{out / shard_name(unit)}: not finished after the job ran (a worker failed?)")
        entries.append(entry)
    stats = src_stats.as_dict()
    for key in ("document_tokens", "dropped_tokens", "pad_tokens"):
        stats[key] = sum(e.stats.get(key, 0) for e in entries)
    m = Manifest(kind="tokens", layout=cfg.layout, k=cfg.k, seq_chunks=cfg.seq_chunks,
                 sample_tokens=cfg.sample_tokens, token_dtype=layout["token_dtype"], tokenizer=tok.describe(),
                 shards=entries, stats=stats, job=job, complete=True)
    write_manifest(m, out)
    log.info(f"tokenize: {len(entries)} shards, {m.num_samples} samples, {m.num_tokens} tokens in {out}")
    return m


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(desc="tokenize", unit="tok", unit_scale=True, smoothing=0.1, dynamic_ncols=True)


def _drive(units: Iterator[list[str]], finished: dict, tok: Tokenizer, layout: dict, out: Path,
           workers: int, bar) -> int:
    """Feed unfinished units to the workers (at most workers+1 in flight); returns the number of units."""
    skipped = 0
    if workers == 0:  # in this process: simplest to debug
        init_worker(tok, None)
        n = 0
        for n, texts in enumerate(units, start=1):
            if n - 1 in finished:
                skipped += 1
                continue
            entry = tokenize_unit(n - 1, texts, str(out), layout)
            if bar is not None:
                bar.update(entry["num_tokens"])
        _worker.clear()
        return n

    ctx = mp.get_context("spawn")
    progress_q = ctx.Queue()
    pending: set = set()
    n = 0

    def drain(timeout: float) -> None:
        done, _ = cf.wait(pending, timeout=timeout, return_when=cf.FIRST_COMPLETED)
        for fut in done:
            pending.discard(fut)
            fut.result()  # a worker's exception stops the job here
        if bar is not None:
            got = 0
            while True:
                try:
                    got += progress_q.get_nowait()
                except queue_mod.Empty:
                    break
            if got:
                bar.update(got)
                bar.set_postfix(shards_done=n - len(pending) - skipped, skipped=skipped, refresh=False)

    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=init_worker,
                                initargs=(tok, progress_q, os.getpid())) as pool:
        try:
            for unit, texts in enumerate(units):
                n = unit + 1
                if unit in finished:
                    skipped += 1
                    continue
                while len(pending) > workers:
                    drain(0.2)
                pending.add(pool.submit(tokenize_unit, unit, texts, str(out), layout))
            while pending:
                drain(0.2)
            time.sleep(0.05)
            drain(0)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return n
