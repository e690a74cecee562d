"""``calm-data``: tokenize | encode | inspect | verify | demo-tokenizer.

Examples::

    calm-data tokenize corpus.jsonl.zst -o data/tok --tokenizer llama3 --layout lm --k 4 --seq-chunks 512 -j 16
    calm-data tokenize data.parquet -o data/ae_tok --tokenizer demo --layout ae --seq-chunks 64 --text-field content
    torchrun --nproc-per-node 8 -m data_pipeline.cli encode data/tok --ae ae_dir -o data/lat   # or calm-data encode
    calm-data inspect data/lat --ae ae_dir
    calm-data verify data/lat

Errors in the data exit with status 2 and one line naming the file; ``verify`` exits 1 if a shard is damaged.
Re-running ``tokenize`` or ``encode`` with the same arguments finishes an interrupted job.
"""
from __future__ import annotations

import argparse
import logging
import sys

from data_pipeline.errors import DataError


def _tokenize(args) -> int:
    from data_pipeline.tokenize import TokenizeConfig, run_tokenize

    m = run_tokenize(TokenizeConfig(
        inputs=args.inputs, output=args.output, tokenizer=args.tokenizer, layout=args.layout, k=args.k,
        seq_chunks=args.seq_chunks, text_field=args.text_field, split=args.split, subset=args.subset,
        text_unit=args.text_unit, separator=args.separator, add_bos=args.bos, shard_text_mb=args.shard_text_mb,
        max_documents=args.max_documents, workers=args.workers, progress=not args.no_progress))
    print(f"{m.path}: {len(m.shards)} shards, {m.num_samples:,} samples, {m.num_tokens:,} tokens "
          f"({m.stats.get('documents', 0):,} documents; skipped {m.stats.get('empty_documents', 0)} empty, "
          f"{m.stats.get('invalid_utf8', 0)} invalid UTF-8, {m.stats.get('malformed_lines', 0)} malformed)")
    return 0


def _encode(args) -> int:
    from calm_pretrain.release.autoencoder import load_autoencoder
    from data_pipeline.encode import EncodeConfig, run_encode

    m = run_encode(EncodeConfig(tokens=args.tokens, ae=args.ae, output=args.output, dtype=args.dtype,
                                batch_size=args.batch_size, device=args.device, progress=not args.no_progress),
                   load_autoencoder)
    if m is None:
        print(f"{args.output}: this rank's shards are done; others are still running (or failed: re-run)")
    else:
        print(f"{m.path}: {len(m.shards)} shards, {m.num_samples:,} samples, "
              f"{m.num_bytes / max(1, m.num_tokens):.2f} bytes per token ({m.latent['dtype']})")
    return 0


def _inspect(args) -> int:
    from calm_pretrain.release.autoencoder import load_autoencoder
    from data_pipeline.inspection import inspect

    inspect(args.path, samples=args.samples, tokenizer=args.tokenizer, ae=args.ae, chars=args.chars,
            device=args.device, load_ae=load_autoencoder)
    return 0


def _verify(args) -> int:
    from data_pipeline.inspection import verify

    return 1 if verify(args.path) else 0


def _demo_tokenizer(args) -> int:
    from data_pipeline.tokenizers import build_demo_tokenizer

    texts = None
    if args.corpus:
        from data_pipeline.sources import iter_documents, resolve_inputs

        texts = list(iter_documents(resolve_inputs(args.corpus), text_field=args.text_field))
    tok = build_demo_tokenizer(args.output, vocab_size=args.vocab_size, texts=texts)
    print(f"{args.output}: {tok}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from data_pipeline.latent_codec import LATENT_DTYPES

    p = argparse.ArgumentParser(prog="calm-data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tokenize", help="raw text → token shards")
    t.add_argument("inputs", nargs="+", help="jsonl / jsonl.zst / parquet / txt files, globs, directories or a hub dataset name")
    t.add_argument("-o", "--output", required=True, help="output shard directory")
    t.add_argument("--tokenizer", default="demo", help="demo | llama3[:DIR] | a tokenizer directory | an AutoTokenizer name")
    t.add_argument("--layout", choices=["lm", "ae"], default="lm", help="lm: documents joined by EOS; ae: each document + EOS padded to K")
    t.add_argument("--k", type=int, default=4, help="tokens per chunk (K)")
    t.add_argument("--seq-chunks", type=int, default=512, help="chunks per sample (L); a sample is L*K tokens")
    t.add_argument("--text-field", default="text")
    t.add_argument("--split", default="train", help="split of a hub dataset")
    t.add_argument("--subset", default=None, help="configuration of a hub dataset")
    t.add_argument("--text-unit", choices=["document", "paragraph", "line"], default="document", help="plain text files: what a document is")
    t.add_argument("--separator", choices=["eos", "none"], default="eos", help="lm layout: token between documents")
    t.add_argument("--bos", action="store_true", help="lm layout: BOS before each document")
    t.add_argument("--shard-text-mb", type=float, default=32.0, help="text per shard (bounds shard size)")
    t.add_argument("--max-documents", type=int, default=None, help="stop after this many documents")
    t.add_argument("-j", "--workers", type=int, default=max(1, (__import__("os").cpu_count() or 2) - 1),
                   help="tokenizer processes (0: in this process)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=_tokenize)

    e = sub.add_parser("encode", help="token shards → latent shards with a frozen autoencoder (RANK/WORLD_SIZE from torchrun)")
    e.add_argument("tokens", help="token shard directory")
    e.add_argument("--ae", required=True, help="autoencoder directory (config.json + model.safetensors)")
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--dtype", choices=list(LATENT_DTYPES), default="bf16",
                   help="latent storage: bf16, int8 (mu and log_sigma), int8-ls4 (int8 mu, 4-bit log_sigma)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK, mps, cpu) or a torch device")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(fn=_encode)

    i = sub.add_parser("inspect", help="counts, bytes per token, compression, decoded samples")
    i.add_argument("path", help="shard directory or manifest.json")
    i.add_argument("--samples", type=int, default=2)
    i.add_argument("--tokenizer", default=None, help="override the tokenizer recorded in the manifest")
    i.add_argument("--ae", default=None, help="autoencoder directory (latent shards; default: the one recorded)")
    i.add_argument("--chars", type=int, default=300, help="characters of each decoded sample to show")
    i.add_argument("--device", default="cpu")
    i.set_defaults(fn=_inspect)

    v = sub.add_parser("verify", help="re-check every checksum; report damaged shards by name")
    v.add_argument("path")
    v.set_defaults(fn=_verify)

    from data_pipeline.tokenizers import DEMO_VOCAB

    d = sub.add_parser("demo-tokenizer", help="train the demo byte-level BPE tokenizer into a directory (offline)")
    d.add_argument("output")
    d.add_argument("--vocab-size", type=int, default=DEMO_VOCAB, help="vocabulary size, the 3 special tokens included")
    d.add_argument("--corpus", nargs="+", default=None,
                   help="train on these inputs (jsonl / txt / parquet files or globs) instead of the standard library's docs")
    d.add_argument("--text-field", default="text")
    d.set_defaults(fn=_demo_tokenizer)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="calm-data: %(message)s")
    try:
        return args.fn(args)
    except DataError as e:
        print(f"calm-data: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("calm-data: interrupted; re-run the same command to finish", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
