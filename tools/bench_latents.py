#!/usr/bin/env python
"""Latents stored or on the fly (``data.latents``): storage against compute, at two model sizes.

For the tiny dims (configs/tiny/calm.yaml + configs/tiny/ae.yaml) and CALM-M's (configs/calm/calm_m.yaml +
configs/ae/ae_k4_d128.yaml, the published AE) it writes one JSON with, per size:

* ``flops``: the AE encoder's share of the training FLOPs per token (calm_pretrain/flops.py conventions:
  CALM forward + backward, the frozen encoder forward only), at the config's own context and at the
  shape the step time was measured at;
* ``step_time``: CPU seconds per training step, ``stored`` (in-memory latent batches, as the loader
  yields them from latent shards) against ``on_the_fly`` (token-id batches, the frozen AE encoding
  each micro-batch in the step: data_pipeline/on_the_fly.py), both through ``Trainer.train_step``
  (engine step: forward, backward, clip, AdamW) with the same initial weights, alternating in rounds
  in one process; medians, and the AE's encode alone per micro-batch;
* ``bytes_per_token``: token shards against latent shards (bf16, int8, int8-ls4) of the same text,
  written by ``calm-data tokenize`` / ``calm-data encode`` on a slice of the optional
  ../shared/data/corpus_mixed_en.jsonl.zst (random ids when it is absent: said in the JSON).

CALM-M is measured at its widths (hidden 1024, its head, d = 128, vocabulary 128,257, the published AE's
dims) but with ``--m-layers`` backbone layers and ``--m-seq-chunks`` positions, since 16 layers at 2048
positions do not fit a few minutes on a CPU; its FLOPs share is given at both shapes. The AEs are
randomly initialised at their config's dims unless ``--tiny-ae`` / ``--m-ae`` name trained ones: the
encoder's cost does not depend on its weights, but how well latents compress does.

    python tools/bench_latents.py --out docs/latents_bench.json       # a few minutes on 2 loaded cores
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from calm_pretrain.config import load_config  # noqa: E402
from calm_pretrain.models import build_model  # noqa: E402
from calm_pretrain.models.registry import training_flops_per_token  # noqa: E402
from calm_pretrain.train.trainer import Trainer  # noqa: E402
from calm_pretrain.release.autoencoder import load_autoencoder, save_autoencoder  # noqa: E402
from data_pipeline.encode import EncodeConfig, encode_posterior, run_encode  # noqa: E402
from data_pipeline.latent_codec import LATENT_DTYPES  # noqa: E402
from data_pipeline.on_the_fly import OnTheFlyLatents  # noqa: E402

CORPUS = REPO.parent / "shared" / "data" / "corpus_mixed_en.jsonl.zst"
LLAMA3 = REPO.parent / "shared" / "data" / "llama3_tokenizer"


def log(msg: str) -> None:
    print(f"[bench_latents {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sizes(args) -> dict:
    """name → (CALM config, AE config, overrides of the measured shape, tokenizer, trained AE or None)."""
    llama = f"llama3:{LLAMA3}" if LLAMA3.is_dir() else None
    return {
        "tiny": ("configs/tiny/calm.yaml", "configs/tiny/ae.yaml", [], "demo", args.tiny_ae),
        "calm_m": ("configs/calm/calm_m.yaml", "configs/ae/ae_k4_d128.yaml",
                   [f"model.num_layers={args.m_layers}", f"data.seq_chunks={args.m_seq_chunks}",
                    f"train.micro_batch_size={args.m_micro_batch}", "train.grad_accum_steps=1", "train.precision=fp32",
                    "model.max_position_embeddings=2048"], llama, args.m_ae),
    }


def frozen_ae(ae_config: str, trained, work: Path, name: str) -> Path:
    """A saved AE directory: the trained one given, else one randomly initialised at the config's dims."""
    if trained:
        return Path(trained)
    torch.manual_seed(0)
    directory = work / f"ae-{name}"
    save_autoencoder(build_model(load_config(ae_config).model).eval(), directory)
    return directory


def flops_share(model_cfg, context: int, ae_cfg) -> dict:
    parts = training_flops_per_token(model_cfg, context, ae_cfg).parts
    encoder = parts["autoencoder"]
    total = sum(parts.values())
    return {"context_positions": context, "calm_mflops_per_token": round((total - encoder) / 1e6, 3),
            "ae_encoder_mflops_per_token": round(encoder / 1e6, 3), "ae_encoder_share": round(encoder / total, 5)}


def _cycle(batches):
    while True:
        yield from batches


def time_steps(cfg, ae, steps: int, rounds: int, warmup: int, work: Path) -> dict:
    """Median step seconds of both modes, alternating rounds, same weights and ids; and the AE's encode alone."""
    gen = torch.Generator().manual_seed(0)
    b, t, vocab = cfg.train.micro_batch_size, cfg.data.seq_chunks * cfg.model.k, cfg.model.vocab_size
    ids = [torch.randint(3, vocab, (b, t), generator=gen) for _ in range(4)]
    transform = OnTheFlyLatents(ae, "cpu", k=cfg.model.k, latent_dim=cfg.model.latent_dim, where="bench AE")
    stored = []
    for x in ids:  # what the loader yields from latent shards: CPU float32 posteriors beside the ids
        mu, log_sigma = encode_posterior(transform.ae, x)
        stored.append({"ids": x, "mu": mu, "log_sigma": log_sigma})
    trainers = {}
    for mode, batches, bt in (("stored", stored, None), ("on_the_fly", [{"ids": x} for x in ids], transform)):
        torch.manual_seed(0)
        trainers[mode] = Trainer(cfg, build_model(cfg.model), _cycle(batches), work / mode, log=lambda s: None,
                                 batch_transform=bt)
        for _ in range(warmup):
            trainers[mode].train_step()
    times: dict = {"stored": [], "on_the_fly": []}
    for r in range(rounds):
        for mode in (("stored", "on_the_fly") if r % 2 == 0 else ("on_the_fly", "stored")):
            for _ in range(steps):
                t0 = time.perf_counter()
                trainers[mode].train_step()
                times[mode].append(time.perf_counter() - t0)
    encode = []
    for i in range(max(8, steps)):
        t0 = time.perf_counter()
        transform({"ids": ids[i % len(ids)]})
        encode.append(time.perf_counter() - t0)
    tokens = b * t * cfg.train.grad_accum_steps
    med = {m: statistics.median(v) for m, v in times.items()}
    return {"tokens_per_step": tokens, "micro_batch": b, "sample_tokens": t, "steps_per_mode": len(times["stored"]),
            "stored_s": round(med["stored"], 4), "on_the_fly_s": round(med["on_the_fly"], 4),
            "overhead": round(med["on_the_fly"] / med["stored"] - 1, 4),
            "encode_only_s_per_step": round(statistics.median(encode) * cfg.train.grad_accum_steps, 4),
            # the robust figure on a shared machine: the encode alone against the on-the-fly step that holds it
            "encode_share_of_step": round(statistics.median(encode) * cfg.train.grad_accum_steps / med["on_the_fly"], 4),
            "all_s": {m: [round(x, 4) for x in v] for m, v in times.items()}}


def bytes_per_token(work: Path, name: str, tokenizer, ae_dir: Path, seq_chunks: int, k: int, n_docs: int,
                    vocab: int) -> dict:
    """Token shards and latent shards (every stored dtype) of the same samples: bytes / token."""
    tok_dir = work / f"tok-{name}"
    if CORPUS.is_file() and tokenizer:
        from data_pipeline.tokenize import TokenizeConfig, run_tokenize
        from tests.helpers.data import corpus_documents, write_jsonl

        src = write_jsonl(work / f"slice-{name}.jsonl", list(corpus_documents(CORPUS, n_docs)))
        m = run_tokenize(TokenizeConfig(inputs=[str(src)], output=str(tok_dir), tokenizer=tokenizer, layout="lm",
                                        k=k, seq_chunks=seq_chunks, workers=1, progress=False))
        source = f"{n_docs} documents of {CORPUS.name}, tokenizer {tokenizer.split(':')[0]}"
    else:
        from tests.helpers.data import write_token_dataset

        rng = np.random.default_rng(0)
        n = max(4, 65536 // (seq_chunks * k))
        m = write_token_dataset(tok_dir, rng.integers(3, vocab, (n, seq_chunks * k)), k=k, vocab_size=vocab)
        source = f"random ids (no {CORPUS.name} or tokenizer)"
    out = {"source": source, "sample_tokens": m.sample_tokens, "tokens": m.num_tokens,
           "token_shards": round(m.num_bytes / m.num_tokens, 3), "token_dtype": m.token_dtype}
    for dtype in LATENT_DTYPES:
        lat = run_encode(EncodeConfig(tokens=str(tok_dir), ae=str(ae_dir), output=str(work / f"lat-{name}-{dtype}"),
                                      dtype=dtype, batch_size=8, device="cpu", progress=False), load_autoencoder)
        out[f"latent_shards_{dtype}"] = round(lat.num_bytes / lat.num_tokens, 3)
    return out


def bench_size(name: str, spec: tuple, args, work: Path) -> dict:
    calm_config, ae_config, shape, tokenizer, trained = spec
    full = load_config(calm_config, ["model.ae_path=unused"])
    bench = load_config(calm_config, ["model.ae_path=unused", *shape, f"train.output_dir={work / 'runs'}"])
    ae_dir = frozen_ae(ae_config, trained, work, name)
    ae = load_autoencoder(ae_dir)
    res = {"calm_config": calm_config, "ae_config": ae_config, "ae_weights": str(trained or "random init"),
           "measured_shape_overrides": shape,
           "flops": {"config": flops_share(full.model, full.data.seq_chunks, ae.config),
                     "measured_shape": flops_share(bench.model, bench.data.seq_chunks, ae.config)}}
    log(f"{name} flops: {res['flops']}")
    res["step_time"] = time_steps(bench, ae, args.steps, args.rounds, args.warmup, work / f"trainer-{name}")
    log(f"{name} step time: { {k: v for k, v in res['step_time'].items() if k != 'all_s'} }")
    res["bytes_per_token"] = bytes_per_token(work, name, tokenizer, ae_dir, full.data.seq_chunks if name == "tiny"
                                             else args.m_bytes_seq_chunks, full.model.k, args.docs, full.model.vocab_size)
    log(f"{name} bytes/token: {res['bytes_per_token']}")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/latents.json")
    p.add_argument("--steps", type=int, default=3, help="steps per mode per round")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds (the order flips every round)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--docs", type=int, default=120, help="corpus documents tokenized for bytes/token")
    p.add_argument("--m-layers", type=int, default=2)
    p.add_argument("--m-seq-chunks", type=int, default=128)
    p.add_argument("--m-micro-batch", type=int, default=2)
    p.add_argument("--m-bytes-seq-chunks", type=int, default=512, help="CALM-M bytes/token sample length (L)")
    p.add_argument("--tiny-ae", help="a trained tiny AE directory (default: random init)")
    p.add_argument("--m-ae", help="a trained K=4, d=128 AE directory (default: random init)")
    p.add_argument("--only", choices=["tiny", "calm_m"])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result = {"command": "python tools/bench_latents.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads,
                          "load_average_start": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__},
              "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="bench_latents_") as tmp:
        for name, spec in sizes(args).items():
            if args.only in (None, name):
                result["sizes"][name] = bench_size(name, spec, args, Path(tmp))
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {out} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
