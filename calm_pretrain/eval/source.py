"""What `calm-pretrain eval` and `generate` score or sample: a model from a release directory (ours or
the published layout), a training run directory or a checkpoint (consolidated on the fly from any
ZeRO / TP / PP layout), with its frozen autoencoder and tokenizer; and the token blocks of an eval set
(any text input `calm-data tokenize` reads, or token shards).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from calm_pretrain.models.registry import spec_of

# The published recipe: WikiText-103's test split at document level, in blocks of each spec's
# published_block_tokens (CALM 8192, the Transformer 2048: the block size moves BrierLM by about 30%).
WIKITEXT_ENV = "CALM_WIKITEXT103_TEST"  # where --published finds the WikiText-103 test documents (jsonl)


class SourceError(ValueError):
    """A model source or eval set that cannot be used; the message names the file."""


@dataclass
class Source:
    model: torch.nn.Module
    arch: str
    ae: Optional[torch.nn.Module]  # CALM's frozen autoencoder
    tokenizer: object  # data_pipeline Tokenizer or None
    context_tokens: int  # the block size the model was trained on (the default eval block size)
    description: str


def _is_release(path: Path) -> bool:
    return (path / "config.json").is_file()


def _load_ae(path: str):
    from calm_pretrain.release.autoencoder import load_autoencoder
    from data_pipeline.errors import DataError

    if not Path(path).is_dir():
        raise SourceError(f"--ae {path}: no such autoencoder directory")
    try:
        return load_autoencoder(path).eval()
    except DataError as e:
        raise SourceError(str(e)) from None


def _calm_ae(cfg, where: Path, ae_dir: Optional[str], embedded_from: Optional[Path]):
    """--ae first, then an embedded copy (ae_model.* in the release), then the config's ae_path if it
    exists here; a published release's ae_path names the authors' machine, hence the --ae flag."""
    from calm_pretrain.release.load import has_embedded_ae

    if ae_dir:
        ae = _load_ae(ae_dir)
    elif embedded_from is not None and has_embedded_ae(embedded_from):
        from calm_pretrain.release import import_release_ae

        ae = import_release_ae(embedded_from)[0].eval()
    elif cfg.ae_path and Path(cfg.ae_path).is_dir():
        ae = _load_ae(cfg.ae_path)
    else:
        hint = f" (its ae_path {cfg.ae_path!r} does not exist here)" if cfg.ae_path else ""
        raise SourceError(f"{where}: a CALM needs its autoencoder: none is embedded{hint}; pass --ae DIR")
    c = ae.config
    if (c.k, c.latent_dim) != (cfg.k, cfg.latent_dim):
        raise SourceError(f"{where}: the autoencoder has K={c.k}, latent {c.latent_dim}; the CALM needs "
                          f"K={cfg.k}, latent {cfg.latent_dim}")
    return ae.requires_grad_(False)


def _tokenizer(spec: Optional[str], release: Optional[Path]):
    from data_pipeline.tokenizers import load_tokenizer

    if spec:
        return load_tokenizer(spec)
    if release is not None and any((release / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        return load_tokenizer(str(release))
    return None


def load_source(path: str | os.PathLike, ae_dir: Optional[str] = None, tokenizer: Optional[str] = None) -> Source:
    """A release directory, a run directory or a checkpoint → the model (eval mode), its AE and tokenizer."""
    from calm_pretrain.release import ReleaseError, import_release
    from calm_pretrain.train.checkpoint import CheckpointError, read_trainer_state, resolve_checkpoint, trained_model

    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: no such release, run directory or checkpoint")
    try:
        if _is_release(path):
            model, cfg = import_release(path)
            model = model.float().eval()
            context = getattr(cfg, "max_position_embeddings", 0) * cfg.tokens_per_position
            what, release = "release", path
        else:
            ckpt = resolve_checkpoint(path)
            model = trained_model(ckpt)
            cfg = model.config
            run_cfg = read_trainer_state(ckpt)["config"]
            context = run_cfg["data"]["seq_chunks"] * cfg.tokens_per_position
            what, release = f"checkpoint {ckpt.name}", None
    except (ReleaseError, CheckpointError) as e:
        raise SourceError(str(e)) from None
    spec = spec_of(cfg)
    ae = _calm_ae(cfg, path, ae_dir, release) if spec.uses_autoencoder else None
    if spec.encodes_latents:  # chunks are scored independently: blocks of 64 chunks
        context = cfg.k * 64
    n = sum(p.numel() for p in model.parameters())
    return Source(model=model.requires_grad_(False), arch=cfg.arch, ae=ae, tokenizer=_tokenizer(tokenizer, release),
                  context_tokens=context, description=f"{cfg.arch} {what} {path} ({n / 1e6:.2f}M parameters)")


def published_eval_set() -> str:
    """The WikiText-103 test documents for --published: $CALM_WIKITEXT103_TEST, else a clear error."""
    path = os.environ.get(WIKITEXT_ENV)
    if not path or not Path(path).is_file():
        raise SourceError(f"--published needs the WikiText-103 test documents (one JSON object per document with a "
                          f"'text' field): pass --data PATH or set {WIKITEXT_ENV}")
    return path


def _shard_stream(path: Path, tokenizer):
    """All token ids of a shard directory in sample order, and its manifest (read once)."""
    import numpy as np

    from data_pipeline.manifest import load_manifest
    from data_pipeline.shards import ShardReader

    manifest = load_manifest(path)
    theirs = manifest.tokenizer_fingerprint
    if tokenizer is not None and theirs and theirs != tokenizer.fingerprint:
        raise SourceError(f"{path}: the shards were made with tokenizer {theirs}, the model's tokenizer is "
                          f"{tokenizer.fingerprint}: tokenize the eval set with the model's tokenizer")
    ids = []
    for entry in manifest.shards:  # in order: an lm-layout shard's samples are consecutive text
        with ShardReader(manifest.shard_path(entry), expected_bytes=entry.bytes, num_samples=entry.num_samples) as r:
            ids.append(torch.from_numpy(np.ascontiguousarray(r.read_samples(range(r.num_samples))["ids"])).long().flatten())
    return torch.cat(ids), manifest


def _subset(blocks: list, max_blocks: int, seed: int = 0) -> list:
    """`max_blocks` of the blocks drawn without replacement by a fixed seed, kept in their order: a
    spread over the whole eval set (the first N blocks would come from a few neighbouring documents)."""
    if not max_blocks or max_blocks >= len(blocks):
        return blocks
    pick = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))[:max_blocks]
    return [blocks[i] for i in sorted(pick.tolist())]


def heldout_blocks(path: str | os.PathLike, max_blocks: int = 0, block_tokens: Optional[int] = None,
                   batch: int = 1, tokenizer=None) -> list[torch.Tensor]:
    """Held-out token shards → [batch, block_tokens] blocks (block_tokens: the shards' sample length),
    `max_blocks` of them spread over the set (0: all). The one way every evaluation reads token shards:
    the trainer's periodic eval, the main job, the sweep and `calm-pretrain eval`."""
    return _heldout_blocks(Path(path), max_blocks, block_tokens, batch, tokenizer)[0]


def _heldout_blocks(path: Path, max_blocks: int, block_tokens: Optional[int], batch: int, tokenizer):
    stream, manifest = _shard_stream(path, tokenizer)
    block_tokens = block_tokens or manifest.sample_tokens
    blocks = _subset([stream[i * block_tokens:(i + 1) * block_tokens] for i in range(stream.numel() // block_tokens)],
                     max_blocks)
    # Batches of `batch` blocks; the last one holds the remainder, so every selected block is scored.
    return [torch.stack(blocks[i:i + batch]) for i in range(0, len(blocks), batch)], manifest


def eval_blocks(inputs: list[str], tokenizer, block_tokens: int, max_blocks: int = 0,
                text_field: str = "text") -> tuple[list[torch.Tensor], dict]:
    """[1, block_tokens] blocks of the eval set and its description (paths, fingerprint of the ids)."""
    from data_pipeline.evalset import eval_blocks as text_blocks

    if len(inputs) == 1 and (Path(inputs[0]) / "manifest.json").is_file():
        blocks, manifest = _heldout_blocks(Path(inputs[0]), max_blocks, block_tokens, 1, tokenizer)
        tok_fp = manifest.tokenizer_fingerprint
    else:
        if tokenizer is None:
            raise SourceError(f"{', '.join(inputs)}: text needs a tokenizer; the source has none saved with it: "
                              "pass --tokenizer")
        for p in inputs:
            if not Path(p).exists():
                raise SourceError(f"{p}: no such eval file")
        blocks = [b for p in inputs for b in text_blocks(p, tokenizer, block_tokens, text_field)]
        tok_fp = tokenizer.fingerprint
        blocks = _subset(blocks, max_blocks)
    if not blocks:
        raise SourceError(f"{', '.join(inputs)}: yields no full block of {block_tokens} tokens")
    digest = hashlib.sha256()
    for b in blocks:
        digest.update(b.to(torch.int64).numpy().tobytes())
    return blocks, {"inputs": list(inputs), "tokenizer_fingerprint": tok_fp, "blocks": len(blocks),
                    "block_tokens": block_tokens, "tokens": len(blocks) * block_tokens,
                    "ids_fingerprint": digest.hexdigest()[:16]}
