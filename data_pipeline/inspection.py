"""``calm-data inspect`` (what a shard directory holds, decoded samples) and ``verify`` (every checksum)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional, TextIO

import numpy as np

from data_pipeline.errors import DataError, ManifestError
from data_pipeline.manifest import (DONE_SUFFIX, Manifest, ShardEntry, load_manifest, manifest_path,
                                    schema_mismatches)
from data_pipeline.shards import ShardReader, ShardSpec, verify_shard

log = logging.getLogger(__name__)


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def bytes_per_token(m: Manifest) -> float:
    return m.num_bytes / max(1, m.num_tokens)


def raw_bytes(m: Manifest) -> int:
    """Uncompressed size of the stored arrays (what the shards would take without zstd)."""
    spec = ShardSpec(m.kind, m.sample_tokens, m.token_dtype, m.k, m.latent_dim or 0,
                     (m.latent or {}).get("dtype", ""))
    return m.num_samples * spec.row_bytes()


def summary(m: Manifest) -> dict:
    """The numbers `inspect` prints, as a dict (also used by the benchmark)."""
    st = m.stats
    out = {"kind": m.kind, "layout": m.layout, "k": m.k, "seq_chunks": m.seq_chunks,
           "sample_tokens": m.sample_tokens, "shards": len(m.shards), "samples": m.num_samples,
           "tokens": m.num_tokens, "bytes": m.num_bytes, "bytes_per_token": bytes_per_token(m),
           "zstd_ratio": raw_bytes(m) / max(1, m.num_bytes)}
    if st.get("text_bytes"):
        out["text_bytes"] = st["text_bytes"]
        out["text_bytes_per_token"] = st["text_bytes"] / max(1, st.get("document_tokens") or m.num_tokens)
        out["text_to_shard_ratio"] = st["text_bytes"] / max(1, m.num_bytes)
    if m.latent:
        out["latent_dim"], out["latent_dtype"] = m.latent_dim, m.latent["dtype"]
    return out


def inspect(path: str, samples: int = 2, tokenizer: Optional[str] = None, ae: Optional[str] = None,
            chars: int = 300, device: str = "cpu", out: Optional[TextIO] = None,
            load_ae: Optional[Callable] = None) -> dict:
    """Print what the directory holds and decode a few samples; returns the numbers printed. Latents are
    decoded with the autoencoder `ae` (default: the one the manifest names), read by `load_ae(path,
    device)`; without `load_ae` they are not decoded."""
    import sys

    out = out or sys.stdout
    m = load_manifest(path)
    s = summary(m)
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"{m.path}")
    p(f"  {m.kind} shards, layout {m.layout}: K={m.k}, L={m.seq_chunks}, {m.sample_tokens} tokens per sample, "
      f"ids stored as {m.token_dtype}")
    t = m.tokenizer
    p(f"  tokenizer {t.get('spec')} ({t.get('type')}): vocab {t.get('vocab_size')}, bos {t.get('bos_id')}, "
      f"eos {t.get('eos_id')}, pad {t.get('pad_id')}, fingerprint {t.get('fingerprint')}")
    if m.latent:
        lt = m.latent
        p(f"  latents: d={lt['latent_dim']}, {lt['dtype']}, autoencoder {lt['ae_fingerprint']} ({lt.get('ae_path')}), "
          f"from token manifest {lt['token_manifest']['fingerprint']} ({lt['token_manifest']['path']})")
    p(f"  {len(m.shards)} shards, {m.num_samples:,} samples, {m.num_tokens:,} tokens, {_mb(m.num_bytes)} on disk")
    p(f"  bytes per token: {s['bytes_per_token']:.2f} on disk; zstd compression {s['zstd_ratio']:.2f}x "
      f"(raw arrays {_mb(raw_bytes(m))})")
    st = m.stats
    if "text_bytes_per_token" in s:
        p(f"  text: {_mb(st['text_bytes'])} in {st.get('documents', 0):,} documents; "
          f"{s['text_bytes_per_token']:.2f} text bytes per token; text/shard bytes {s['text_to_shard_ratio']:.2f}x")
    skipped = {k: st[k] for k in ("empty_documents", "invalid_utf8", "malformed_lines") if st.get(k)}
    p(f"  skipped: {', '.join(f'{v} {k}' for k, v in skipped.items()) or 'nothing'}; "
      f"dropped tail tokens {st.get('dropped_tokens', 0):,}, pad tokens {st.get('pad_tokens', 0):,}")
    if samples > 0 and m.shards:
        s.update(_show_samples(m, samples, tokenizer, ae, chars, device, p, load_ae))
    return s


def _show_samples(m: Manifest, n: int, tokenizer: Optional[str], ae_dir: Optional[str], chars: int, device, p,
                  load_ae: Optional[Callable]) -> dict:
    from data_pipeline.tokenizers import load_tokenizer

    entry = m.shards[0]
    with ShardReader(m.shard_path(entry), expected_bytes=entry.bytes, num_samples=entry.num_samples) as r:
        rows = r.read_samples(np.arange(min(n, r.num_samples)))
    tok = None
    spec = tokenizer or m.tokenizer.get("spec")
    try:
        tok = load_tokenizer(spec)
        if tok.fingerprint != m.tokenizer.get("fingerprint"):
            p(f"  warning: tokenizer {spec} has fingerprint {tok.fingerprint}, the shards {m.tokenizer.get('fingerprint')}")
    except Exception as e:  # noqa: BLE001 - inspect still shows the numbers without a tokenizer
        p(f"  (cannot load tokenizer {spec!r} to decode: {e})")
    result: dict = {}
    recon = None
    if m.kind == "latents" and load_ae is not None:
        recon, acc = _reconstruct(m, rows, ae_dir, device, p, load_ae)
        if acc is not None:
            result["reconstruction_accuracy"] = acc
            p(f"  AE reconstruction from stored mu: {100 * acc:.3f}% of {rows['ids'].size} tokens")
    for i, ids in enumerate(rows["ids"]):
        p(f"  --- sample {i} ({entry.file}, row {i}) ---")
        if tok is not None:
            p("  " + repr(tok.decode(ids.tolist())[:chars]))
            if recon is not None:
                p("  decoded from latents: " + repr(tok.decode(recon[i].tolist())[:chars]))
        else:
            p(f"  ids: {ids[:32].tolist()} ...")
    return result


def _reconstruct(m: Manifest, rows: dict, ae_dir: Optional[str], device: str, p, load_ae: Callable):
    import torch

    from data_pipeline.ae_io import autoencoder_fingerprint

    ae_dir = ae_dir or m.latent.get("ae_path")
    if not ae_dir or not Path(ae_dir).is_dir():
        p(f"  (autoencoder {ae_dir!r} not found: pass --ae to decode latents)")
        return None, None
    ae = load_ae(ae_dir, device)
    fp = autoencoder_fingerprint(ae)
    if fp != m.ae_fingerprint:
        raise DataError(f"{m.path}: latents were made by autoencoder {m.ae_fingerprint}, {ae_dir} is {fp}")
    with torch.no_grad():
        logits = ae.decode(torch.from_numpy(rows["mu"]).to(device))
    recon = logits.argmax(-1).cpu().numpy()
    return recon, float((recon == rows["ids"]).mean())


# --------------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------------
def _schema_problem(m: Manifest, shard: Path) -> Optional[str]:
    """How the shard's own schema disagrees with the manifest (an edited k or latent_dim), or None."""
    with ShardReader(shard) as r:
        problems = schema_mismatches(m, r.spec)
    return f"does not match the manifest ({'; '.join(problems)})" if problems else None


def verify(path: str, out: Optional[TextIO] = None, progress: bool = True) -> list[str]:
    """Re-check every shard (size, sha256, each row's CRC); prints one line per shard and returns the
    names of the damaged ones. Works on unfinished directories too (from the ``.done`` records)."""
    import sys

    from tqdm import tqdm

    out = out or sys.stdout
    mp = manifest_path(path)
    if mp.is_file():
        m = load_manifest(mp, require_complete=False, check_files=False)
        entries, base, what = m.shards, mp.parent, str(mp)
    else:
        base = Path(path)
        recs = sorted(base.glob(f"*{DONE_SUFFIX}")) if base.is_dir() else []
        if not recs:
            raise ManifestError(f"no manifest at {mp} and no finished shards in {base}")
        entries = [ShardEntry.from_dict(json.loads(r.read_text())) for r in recs]
        what = f"{base} (no manifest: checking the {len(entries)} finished-shard records)"
    print(f"verifying {len(entries)} shards of {what}", file=out)
    damaged = []
    # The bar only on a terminal: in a log file its carriage-return redraws run into the per-shard lines.
    bar = tqdm(total=sum(e.bytes for e in entries), desc="verify", unit="B", unit_scale=True,
               disable=not progress or not sys.stderr.isatty(), file=sys.stderr, dynamic_ncols=True)
    for e in entries:
        problem = verify_shard(base / e.file, e.bytes, e.sha256, e.num_samples)
        if problem is None and mp.is_file():
            problem = _schema_problem(m, base / e.file)
        bar.update(e.bytes)
        if problem:
            damaged.append(e.file)
            bar.write(f"  DAMAGED {e.file}: {problem}", file=out)
        else:
            bar.write(f"  ok      {e.file}", file=out)
    bar.close()
    print(f"{len(damaged)} damaged shard(s)" + (": " + ", ".join(damaged) if damaged else ""), file=out)
    return damaged
