"""Token shards → latent shards with the frozen autoencoder (pre-encoding).

Per sample a latent shard holds the tokens [L·K] and, per chunk, the posterior mu and log_sigma [L, d]
(not a sample: the energy loss draws its targets from the posterior at train time). Latents are stored
as bf16 (default), int8 with a per-vector scale (``dtype="int8"``, about half the bytes) or int8 mu with
4-bit log_sigma (``dtype="int8-ls4"``; data_pipeline/latent_codec.py).

Runs as one process per GPU: under ``torchrun`` (or ``srun`` with RANK/WORLD_SIZE set) rank r encodes
token shards r, r+W, r+2W, ... on device ``cuda:LOCAL_RANK``; the device is chosen at run time (CUDA,
then MPS, then CPU, or ``device=...``). Batches run under ``torch.no_grad`` and, on CUDA, bf16 autocast.
No process group is needed: every rank writes its own shards and ``.done`` records, and whichever rank
finds all shards finished writes ``manifest.json`` (identical content whoever writes it). Re-running
skips every finished and verified shard, so an interrupted or partly failed job is finished by running
it again (with any world size).

The manifest records the AE fingerprint (weights + config), K, d, dtype, the tokenizer and the
fingerprint of the token manifest the shards came from; training checks them with
:func:`data_pipeline.manifest.check_compatible`.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from calm_pretrain.parallel.distributed import env_rank, env_world_size, local_rank
from data_pipeline.ae_io import autoencoder_fingerprint
from data_pipeline.errors import DataError, IncompatibleDataError
from data_pipeline.files import remove_stale_tmp
from data_pipeline.manifest import (
    Manifest,
    ShardEntry,
    claim_job,
    finished_shards,
    load_manifest,
    read_done,
    write_done,
    write_manifest,
)
from data_pipeline.shards import LATENT_DTYPES, ShardReader, ShardSpec, ShardWriter

log = logging.getLogger(__name__)


@dataclass
class EncodeConfig:
    tokens: str  # token shard directory (manifest.json inside)
    ae: str  # autoencoder directory (config.json + model.safetensors)
    output: str
    dtype: str = "bf16"  # bf16 | int8 | int8-ls4 (data_pipeline/latent_codec.py)
    batch_size: int = 32  # samples per forward pass
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    rank: Optional[int] = None  # default: $RANK or 0
    world_size: Optional[int] = None  # default: $WORLD_SIZE or 1
    progress: bool = True


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`: cuda:$LOCAL_RANK when CUDA is available, else MPS, else CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def dist_rank_world(rank: Optional[int] = None, world_size: Optional[int] = None) -> tuple[int, int]:
    r = env_rank() if rank is None else int(rank)  # the launcher's (calm_pretrain.parallel.distributed)
    w = env_world_size() if world_size is None else int(world_size)
    if w < 1 or not 0 <= r < w:
        raise DataError(f"bad rank/world size: rank {r}, world size {w}")
    return r, w


def encode_posterior(ae, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mu, log_sigma) float32 [n, L, d] of token ids [n, L·K], on the ids' device: under
    ``torch.no_grad``, in bf16 autocast on CUDA. The one encoding of pre-encoding (below) and of
    ``data.latents=on_the_fly`` (data_pipeline/on_the_fly.py)."""
    with torch.no_grad(), torch.autocast(device_type=ids.device.type, dtype=torch.bfloat16,
                                         enabled=ids.device.type == "cuda"):
        mu, log_sigma = ae.encode(ids)
    return mu.float(), log_sigma.float()


def encode_ids(ae, ids: np.ndarray, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Posterior (mu, log_sigma) float32 [n, L, d] of token ids [n, L·K], as numpy arrays."""
    x = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(device, non_blocking=True)
    mu, log_sigma = encode_posterior(ae, x)
    return mu.cpu().numpy(), log_sigma.cpu().numpy()


def check_ae_matches_tokens(ae, tm: Manifest) -> None:
    cfg, tok = ae.config, tm.tokenizer
    where = tm.path
    if tm.sample_tokens % cfg.k:
        raise IncompatibleDataError(f"{where}: samples of {tm.sample_tokens} tokens are not a multiple of the "
                                    f"autoencoder's K = {cfg.k}")
    if tm.layout == "ae" and tm.k != cfg.k:
        raise IncompatibleDataError(f"{where}: ae-layout shards are padded to K = {tm.k}, the autoencoder has K = {cfg.k}")
    if tok.get("vocab_size", 0) > cfg.vocab_size:
        raise IncompatibleDataError(f"{where}: tokenizer vocab_size = {tok['vocab_size']} exceeds the autoencoder's "
                                    f"vocab_size = {cfg.vocab_size}")
    for name, mine in (("eos_id", cfg.eos_token_id), ("pad_id", cfg.pad_token_id)):
        if tok.get(name) is not None and tok[name] != mine:
            raise IncompatibleDataError(f"{where}: tokenizer {name} = {tok[name]} but the autoencoder's config has "
                                        f"{mine}: the autoencoder was trained with another tokenizer")


def latent_shard_name(i: int) -> str:
    return f"latents-{i:05d}.arrow"


def run_encode(cfg: EncodeConfig, load_ae: Callable) -> Optional[Manifest]:
    """Encode this rank's shards; returns the manifest if every shard is now finished, else None.
    `load_ae(path, device)` reads the autoencoder `cfg.ae` names (the command passes
    calm_pretrain.release.autoencoder.load_autoencoder: the data pipeline sits below the release code)."""
    if cfg.dtype not in LATENT_DTYPES:
        raise DataError(f"dtype must be one of {', '.join(LATENT_DTYPES)}, got {cfg.dtype!r}")
    rank, world = dist_rank_world(cfg.rank, cfg.world_size)
    device = resolve_device(cfg.device)
    tm = load_manifest(cfg.tokens)
    ae = load_ae(cfg.ae, device)
    check_ae_matches_tokens(ae, tm)
    ae_fp = autoencoder_fingerprint(ae)
    out = Path(cfg.output)
    latent = {"latent_dim": ae.config.latent_dim, "dtype": cfg.dtype, "ae_fingerprint": ae_fp,
              "ae_config": dataclasses.asdict(ae.config), "ae_path": str(Path(cfg.ae).resolve()),
              "token_manifest": {"path": str(tm.path.resolve()), "fingerprint": tm.fingerprint()}}
    claim_job(out, {"stage": "encode", "token_manifest": latent["token_manifest"]["fingerprint"],
                    "ae_fingerprint": ae_fp, "dtype": cfg.dtype})
    spec = ShardSpec("latents", tm.sample_tokens, tm.token_dtype, ae.config.k, ae.config.latent_dim, cfg.dtype)

    mine = list(range(rank, len(tm.shards), world))
    remove_stale_tmp(out, only_for=[latent_shard_name(i) for i in mine])
    done = finished_shards([out / latent_shard_name(i) for i in mine], progress=cfg.progress and rank == 0)
    todo = [i for i in mine if out / latent_shard_name(i) not in done]
    log.info(f"encode rank {rank}/{world} on {device}: {len(mine)} shards, {len(mine) - len(todo)} already done")
    bar = None
    if cfg.progress and rank == 0:
        from tqdm import tqdm

        total = sum(tm.shards[i].num_samples for i in todo) * spec.seq_chunks
        bar = tqdm(total=total, desc=f"encode (rank 0 of {world})", unit="latent", unit_scale=True, dynamic_ncols=True)
    for i in todo:
        _encode_shard(ae, device, tm, i, out / latent_shard_name(i), spec, cfg.batch_size, bar)
    if bar is not None:
        bar.close()
    return assemble_manifest(tm, out, latent, spec)


def _encode_shard(ae, device, tm: Manifest, i: int, path: Path, spec: ShardSpec, batch_size: int, bar) -> None:
    src = tm.shards[i]
    with ShardReader(tm.shard_path(src), expected_bytes=src.bytes, num_samples=src.num_samples) as reader, \
            ShardWriter(path, spec) as writer:
        pending: list[np.ndarray] = []
        n_pending = 0

        def run(ids_list):
            ids = np.concatenate(ids_list)
            for s in range(0, len(ids), batch_size):
                part = ids[s:s + batch_size]
                mu, log_sigma = encode_ids(ae, part, device)
                writer.add(part, mu, log_sigma)
                if bar is not None:
                    bar.update(len(part) * spec.seq_chunks)

        for b in range(reader.num_batches):
            ids = reader.read_batch(b)["ids"]
            pending.append(ids)
            n_pending += len(ids)
            if n_pending >= batch_size:
                run(pending)
                pending, n_pending = [], 0
        if pending:
            run(pending)
        info = writer.finish()
    stats = {"source": src.file, "source_sha256": src.sha256}
    if "max_id" in src.stats:  # the ids are the token shard's: the trainer checks them against its vocabulary
        stats["max_id"] = src.stats["max_id"]
    entry = ShardEntry(file=path.name, num_samples=info.num_samples, num_tokens=info.num_samples * spec.sample_tokens,
                       bytes=info.bytes, sha256=info.sha256, stats=stats)
    if info.num_samples != src.num_samples:
        raise DataError(f"{path}: wrote {info.num_samples} samples, {src.file} has {src.num_samples}")
    write_done(path, entry)


def assemble_manifest(tm: Manifest, out: Path, latent: dict, spec: ShardSpec) -> Optional[Manifest]:
    entries = []
    for i in range(len(tm.shards)):
        entry = read_done(out / latent_shard_name(i), verify=False)
        if entry is None:
            return None  # another rank is still working (or failed: re-run to finish)
        entries.append(entry)
    m = Manifest(kind="latents", layout=tm.layout, k=spec.k, seq_chunks=spec.seq_chunks,
                 sample_tokens=spec.sample_tokens, token_dtype=spec.token_dtype, tokenizer=tm.tokenizer,
                 shards=entries, stats={"token_shards": len(tm.shards), **tm.stats}, latent=latent,
                 job={"stage": "encode", "dtype": spec.latent_dtype}, complete=True)
    write_manifest(m, out)
    return m
