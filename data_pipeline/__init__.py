"""calm-data: the data pipeline of CALM pretraining.

    raw text ──tokenize──▶ token shards ──encode (frozen AE)──▶ latent shards ──loader──▶ training

One module, one job:

- ``tokenizers.py``  a small common interface over the demo BPE, the Llama-3 tokenizer (built offline from
  its tiktoken ranks) and anything ``transformers.AutoTokenizer`` loads.
- ``sources.py``     raw documents through HF ``datasets`` (jsonl, jsonl.zst streamed, parquet, text, hub).
- ``tokenize.py``    documents → token shards (AE and LM layouts), many worker processes, resumable.
- ``shards.py``      the shard file format (Arrow IPC + zstd, per-sample CRC32) and latent quantisation.
- ``manifest.py``    ``manifest.json``, per-shard ``.done`` records, compatibility checks.
- ``ae_io.py``       an autoencoder's fingerprint (its directories are read and written by
                    calm_pretrain/release/autoencoder.py; commands pass that loader in)
- ``encode.py``      token shards → latent shards (posterior mu, log_sigma), one process per GPU.
- ``loader.py``      deterministic (seed, epoch) order, DP-size-independent global batches, blending,
  background prefetch, exact resume.
- ``inspection.py``  ``calm-data inspect`` / ``verify``.
- ``cli.py``         the ``calm-data`` console script.

A library below calm_pretrain's release code: of calm_pretrain it imports only the launcher environment
(parallel/distributed.py, for encode's ranks); the autoencoder it encodes with is passed in. Never
release, eval, the trainer or the workflows. ``cli.py`` alone, the command on top, imports the
release package's autoencoder loader and passes it to ``run_encode`` and ``inspect``.

Bad input, and what happens to it (each case has a test in ``tests/test_data_*.py``):

=====================================  ========================================================
empty document (``""`` or ``null``)    skipped, counted in ``stats.empty_documents``
invalid UTF-8 in a JSON line           line skipped, counted in ``stats.invalid_utf8`` (file:line warned)
a line that is not JSON                line skipped, counted in ``stats.malformed_lines`` (file:line warned)
missing text field / non-string text   :class:`InputError` naming the file, line and the fields present
a 10 MB single document                tokenised in whitespace-aligned pieces (identical ids, bounded memory)
truncated .zst stream                  :class:`InputError` naming the file
truncated or bit-flipped shard         :class:`ShardError` naming the shard (size check, per-sample CRC32,
                                       sha256 in ``verify``); never a silent wrong sample
manifest listing a missing file        :class:`ManifestError` naming the shard and the manifest
shards made for another K/d/AE/tok.    :class:`IncompatibleDataError` naming both values and the manifest
=====================================  ========================================================
"""
from data_pipeline.errors import (  # noqa: F401
    DataError,
    IncompatibleDataError,
    InputError,
    ManifestError,
    ShardError,
)
