#!/usr/bin/env python
"""Benchmark of the data pipeline (CPU); writes a JSON of numbers.

What it measures, on a slice of ../shared/data/corpus_mixed_en.jsonl.zst (real English text; an optional
file: docs/data.md, 'Optional data files'):

* tokenize: tokens/s of the tokenizer alone (one process) and of ``calm-data tokenize`` end to end with
  1 and 2 worker processes (reading, tokenizing, packing, writing, verifying), for the Llama-3 tokenizer
  (tiktoken) and the demo BPE (``tokenizers``); bytes per token of the token shards (LM layout, 2048
  tokens per sample as published).
* a tiny autoencoder with the published latent shape (K=4, d=128; hidden 256, demo vocabulary) trained
  for ``--ae-steps`` steps on AE-layout data from another part of the corpus (so the evaluation text is
  held out).
* encode: latents/s of ``calm-data encode`` on CPU, bf16 and 8-bit; bytes per token of the latent
  shards, with the demo tokenizer's uint16 ids (measured) and with Llama-3 int32 ids (shards written
  with the Llama-3 ids of the same text and the trained AE's latents).
* the 8-bit cost: AE reconstruction accuracy (argmax of the decoder at the posterior mean) from fp32
  latents, from the bf16 shards and from the 8-bit shards, and how many tokens change.
* loader: samples/s of ``ShardLoader`` on latent shards of the tiny CALM's shape (configs/tiny:
  K=4, d=32, L=64), against the samples/s a training step of the tiny CALM (forward, backward, AdamW,
  fp32, micro-batch 8) consumes; and how long that training loop waited on ``next()``.

    python tools/bench_data.py --out bench_data.json           # ~10 min on 2 loaded cores
    python tools/bench_data.py --quick --out /tmp/quick.json   # a smaller slice, for a smoke test

The machine's load average is recorded with the numbers: on a shared 2-core machine every figure
moves with what else runs. torch runs with ``--threads`` threads (default 1: oversubscribed cores make
2-thread torch several times slower than 1).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from calm_pretrain.release.autoencoder import load_autoencoder, save_autoencoder  # noqa: E402
from data_pipeline.encode import EncodeConfig, run_encode  # noqa: E402
from data_pipeline.inspection import summary  # noqa: E402
from data_pipeline.loader import ShardLoader  # noqa: E402
from data_pipeline.manifest import load_manifest  # noqa: E402
from data_pipeline.shards import ShardReader, ShardSpec, ShardWriter  # noqa: E402
from data_pipeline.tokenize import TokenizeConfig, init_worker, layout_params, pack_ae, run_tokenize, tokenize_unit  # noqa: E402,E501
from data_pipeline.tokenizers import load_tokenizer  # noqa: E402
from tests.helpers.data import corpus_documents, write_jsonl  # noqa: E402
from tests.helpers.models import tiny_ae_config, train_autoencoder  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


def log(msg: str) -> None:
    print(f"[bench_data {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_all(directory: Path, limit: int | None = None) -> dict:
    m = load_manifest(directory)
    out: dict = {}
    n = 0
    for e in m.shards:
        with ShardReader(m.shard_path(e), expected_bytes=e.bytes) as r:
            for k, v in r.read_samples(np.arange(r.num_samples)).items():
                out.setdefault(k, []).append(v)
        n += e.num_samples
        if limit is not None and n >= limit:
            break
    return {k: np.concatenate(v)[:limit] for k, v in out.items()}


# --------------------------------------------------------------------------------------------
def bench_tokenize(work: Path, corpus: Path, n_docs: int, llama_spec: str) -> dict:
    res: dict = {}
    docs = list(corpus_documents(corpus, n_docs))
    src = write_jsonl(work / "slice.jsonl.zst", docs, compress=True)
    text_mb = sum(len(d.encode()) for d in docs) / 1e6
    res["slice"] = {"documents": len(docs), "text_mb": round(text_mb, 2)}
    for name, spec, frac in (("llama3", llama_spec, 1.0), ("demo", "demo", 0.35)):
        tok = load_tokenizer(spec)
        sample = docs[: max(50, int(len(docs) * 0.15))]
        t0 = time.perf_counter()
        ids = tok.encode_batch(sample)
        dt = time.perf_counter() - t0
        r = {"tokenizer_only_tokens_per_s": round(sum(map(len, ids)) / dt),
             "tokenizer_only_text_mb_per_s": round(sum(len(d.encode()) for d in sample) / dt / 1e6, 2)}
        # one worker's steady state: tokenize + pack + write + verify one unit, in this process
        init_worker(tok, None)
        layout = layout_params(TokenizeConfig(inputs=[], output="", seq_chunks=512), tok)
        t0 = time.perf_counter()
        entry = tokenize_unit(0, sample, str(work / f"unit-{name}"), layout)
        dt = time.perf_counter() - t0
        r["worker_steady_state_tokens_per_s"] = round(entry["stats"]["document_tokens"] / dt)
        n = int(len(docs) * frac)
        part = src if frac == 1.0 else write_jsonl(work / f"slice-{name}.jsonl.zst", docs[:n], compress=True)
        for workers in (1, 2):
            out = work / f"tok-{name}-w{workers}"
            t0 = time.perf_counter()
            m = run_tokenize(TokenizeConfig(inputs=[str(part)], output=str(out), tokenizer=spec, layout="lm", k=4,
                                            seq_chunks=512, workers=workers, shard_text_mb=2.0, progress=False),
                             tokenizer=tok)
            dt = time.perf_counter() - t0
            toks = m.stats["document_tokens"]
            r[f"workers_{workers}"] = {"seconds": round(dt, 2), "tokens": toks, "tokens_per_s": round(toks / dt),
                                       "tokens_per_s_per_worker": round(toks / dt / workers)}
            if workers == 1:
                s = summary(m)
                r["token_shards"] = {"bytes_per_token": round(s["bytes_per_token"], 3),
                                     "zstd_ratio": round(s["zstd_ratio"], 2), "token_dtype": m.token_dtype,
                                     "text_bytes_per_token": round(s["text_bytes_per_token"], 3)}
        res[name] = r
        log(f"tokenize {name}: {r}")
    return res


def train_ae(work: Path, corpus: Path, steps: int, n_docs: int) -> tuple[Path, dict]:
    from calm_pretrain.models.autoencoder.model import Autoencoder

    tok = load_tokenizer("demo")
    docs = list(corpus_documents(corpus, n_docs, skip=12000))  # another part of the corpus: held out
    samples, _ = pack_ae(tok.encode_batch(docs), 128, 4, tok.eos_id, tok.pad_id)
    torch.manual_seed(0)
    cfg = tiny_ae_config(latent_dim=128, hidden_size=256, intermediate_size=512)
    ae = Autoencoder(cfg)
    t0 = time.perf_counter()
    accs = train_autoencoder(ae, samples, steps, lr=3e-3, log_every=50)
    dt = time.perf_counter() - t0
    d = work / "ae_k4_d128"
    save_autoencoder(ae, d)
    info = {"config": {"k": 4, "latent_dim": 128, "hidden_size": 256, "intermediate_size": 512, "vocab_size": 4096},
            "steps": steps, "batch": "16 x 128 tokens", "seconds": round(dt, 1),
            "train_accuracy_last_20": round(float(np.mean(accs[-20:])), 4)}
    log(f"AE: {info}")
    return d, info


def bench_encode(work: Path, ae_dir: Path, llama_tokens: Path, demo_tokens_src: Path, eval_samples: int) -> dict:

    res: dict = {}
    # LM token shards (demo) with 2048 tokens per sample, as the published CALM reads them
    for dtype in ("bf16", "int8"):
        out = work / f"lat-{dtype}"
        t0 = time.perf_counter()
        m = run_encode(EncodeConfig(tokens=str(demo_tokens_src), ae=str(ae_dir), output=str(out), dtype=dtype,
                                    batch_size=8, device="cpu", progress=False), load_autoencoder)
        dt = time.perf_counter() - t0
        latents = m.num_samples * m.seq_chunks
        s = summary(m)
        res[dtype] = {"seconds": round(dt, 2), "latents": latents, "latents_per_s": round(latents / dt),
                      "tokens_per_s": round(m.num_tokens / dt), "bytes_per_token_demo_ids_uint16":
                      round(s["bytes_per_token"], 2), "zstd_ratio": round(s["zstd_ratio"], 3)}
        log(f"encode {dtype}: {res[dtype]}")

    # the same latents with Llama-3 ids (int32) of the same text: what a Llama-3 latent shard weighs
    lat = read_all(work / "lat-bf16")
    llama = read_all(llama_tokens)
    n = min(len(lat["ids"]), len(llama["ids"]))
    lat = {k: v[:n] for k, v in lat.items()}
    llama = {k: v[:n] for k, v in llama.items()}
    for dtype in ("bf16", "int8"):
        d = work / f"lat-llama-{dtype}"
        spec = ShardSpec("latents", 2048, "int32", 4, 128, dtype)
        with ShardWriter(d / "latents-00000.arrow", spec) as w:
            for s in range(0, n, 64):
                w.add(llama["ids"][s:s + 64], lat["mu"][s:s + 64], lat["log_sigma"][s:s + 64])
            info = w.finish()
        res[dtype]["bytes_per_token_llama3_ids_int32"] = round(info.bytes / (n * 2048), 2)

    # the 8-bit cost in reconstruction accuracy (held-out text)
    ae = load_autoencoder(ae_dir)
    bf = read_all(work / "lat-bf16", eval_samples)
    q8 = read_all(work / "lat-int8", eval_samples)
    ids = torch.from_numpy(bf["ids"])
    preds = {}
    with torch.no_grad():
        full_mu, _ = ae.encode(ids)
        for name, mu in (("fp32", full_mu), ("bf16", torch.from_numpy(bf["mu"])), ("int8", torch.from_numpy(q8["mu"]))):
            preds[name] = torch.cat([ae.decode(mu[i:i + 8]).argmax(-1) for i in range(0, len(mu), 8)])
    acc = {k: float((p == ids).float().mean()) for k, p in preds.items()}
    res["reconstruction"] = {
        "tokens": int(ids.numel()),
        "accuracy_fp32": round(acc["fp32"], 5), "accuracy_bf16": round(acc["bf16"], 5),
        "accuracy_int8": round(acc["int8"], 5),
        "int8_minus_fp32_pp": round(100 * (acc["int8"] - acc["fp32"]), 4),
        "bf16_minus_fp32_pp": round(100 * (acc["bf16"] - acc["fp32"]), 4),
        "tokens_changed_int8_vs_fp32": int((preds["int8"] != preds["fp32"]).sum()),
        "tokens_changed_bf16_vs_fp32": int((preds["bf16"] != preds["fp32"]).sum()),
        "mu_max_abs_err_int8": float((torch.from_numpy(q8["mu"]) - full_mu).abs().max()),
    }
    log(f"reconstruction: {res['reconstruction']}")
    return res


def bench_loader(work: Path, demo_tokens: Path, steps: int) -> dict:
    from calm_pretrain.config import load_config
    from calm_pretrain.models import build_model
    from calm_pretrain.models.autoencoder.model import Autoencoder

    run = load_config(REPO / "configs" / "tiny" / "calm.yaml")
    ae_cfg = load_config(REPO / "configs" / "tiny" / "ae.yaml").model
    torch.manual_seed(0)
    ae_dir = work / "tiny_ae"
    save_autoencoder(Autoencoder(ae_cfg), ae_dir)
    lat = work / "lat-tiny"
    run_encode(EncodeConfig(tokens=str(demo_tokens), ae=str(ae_dir), output=str(lat), dtype="bf16", device="cpu",
                            progress=False), load_autoencoder)
    mb = run.train.micro_batch_size
    res: dict = {"micro_batch_size": mb, "seq_chunks": run.data.seq_chunks, "latent_dim": run.model.latent_dim}
    for prefetch in (0, 4):  # a 1 MB batch cache: nearly every sample decompresses its record batch
        ld = ShardLoader(lat, global_batch_size=mb, seed=1, prefetch=prefetch, cache_mb=1,
                         expect={"k": run.model.k, "latent_dim": run.model.latent_dim})
        next(ld)
        t0 = time.perf_counter()
        n = 300
        for _ in range(n):
            next(ld)
        dt = time.perf_counter() - t0
        ld.close()
        res[f"loader_samples_per_s_prefetch_{prefetch}"] = round(n * mb / dt)
    model = build_model(run.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ld = ShardLoader(lat, global_batch_size=mb, seed=2, prefetch=4)
    waited = 0.0
    times = []
    for step in range(steps + 2):
        t0 = time.perf_counter()
        b = next(ld)
        t1 = time.perf_counter()
        out = model(b["ids"], b["mu"], b["log_sigma"])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        t2 = time.perf_counter()
        if step >= 2:  # warm-up
            waited += t1 - t0
            times.append(t2 - t0)
    ld.close()
    step_s = float(np.median(times))
    res.update({"calm_step_seconds_median": round(step_s, 4), "calm_consumes_samples_per_s": round(mb / step_s, 1),
                "loader_wait_fraction_of_training_time": round(waited / sum(times), 5), "training_steps": steps})
    res["loader_headroom_x"] = round(res["loader_samples_per_s_prefetch_4"] / res["calm_consumes_samples_per_s"], 1)
    log(f"loader: {res}")
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_data.json")
    p.add_argument("--corpus", default=str(SHARED / "corpus_mixed_en.jsonl.zst"))
    p.add_argument("--docs", type=int, default=2500, help="documents in the tokenize/encode slice")
    p.add_argument("--ae-steps", type=int, default=300)
    p.add_argument("--eval-samples", type=int, default=48, help="2048-token samples for the reconstruction test")
    p.add_argument("--calm-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--workdir", default=None, help="keep the shards here (default: a temporary directory)")
    args = p.parse_args()
    if args.quick:
        args.docs, args.ae_steps, args.eval_samples, args.calm_steps = 300, 30, 8, 5
    torch.set_num_threads(args.threads)
    corpus = Path(args.corpus)
    if not corpus.is_file():
        print(f"corpus {corpus} not found", file=sys.stderr)
        return 2
    llama_spec = f"llama3:{SHARED / 'llama3_tokenizer'}"
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_data-"))
    work.mkdir(parents=True, exist_ok=True)
    result = {"machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg(), "python": platform.python_version(),
                          "torch": torch.__version__, "torch_threads": args.threads},
              "args": vars(args)}
    t0 = time.time()
    try:
        result["tokenize"] = bench_tokenize(work, corpus, args.docs, llama_spec)
        ae_dir, result["autoencoder"] = train_ae(work, corpus, args.ae_steps, 400 if not args.quick else 60)
        result["encode"] = bench_encode(work, ae_dir, work / "tok-llama3-w1", work / "tok-demo-w1", args.eval_samples)
        # the loader benchmark reads the tiny CALM's shape: re-tokenize a part at L=64
        tiny_tok = work / "tok-demo-tiny"
        run_tokenize(TokenizeConfig(inputs=[str(work / "slice-demo.jsonl.zst")], output=str(tiny_tok), tokenizer="demo",
                                    seq_chunks=64, workers=0, max_documents=300, progress=False))
        result["loader"] = bench_loader(work, tiny_tok, args.calm_steps)
    finally:
        result["machine"]["load_avg_end"] = os.getloadavg()
        result["seconds"] = round(time.time() - t0, 1)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        log(f"wrote {args.out}")
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
