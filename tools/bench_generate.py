"""Generation speed: wall-clock per generated token for CALM (K tokens per step) and the Transformer
baseline, same machine, same run, and their ratio.

    python3 tools/bench_generate.py [--calm configs/tiny/calm.yaml] [--transformer configs/tiny/transformer.yaml]
                                    [--ae configs/tiny/ae.yaml] [--tokens 128] [--batch 1] [--temperature 1.0]

Models are freshly initialised (speed does not depend on the weights; EOS is disabled so every run
generates exactly --tokens tokens), with the KV cache, batch --batch. The two models alternate for
--rounds rounds; medians are reported. A CALM step is one backbone position + head samples + the
AE decoder for K tokens; at T < 1 it also draws candidates. Results: bench_out/generate.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from calm_pretrain.config import load_config
from calm_pretrain.models import build_model, count_parameters
from calm_pretrain.sampling import generate_calm, generate_transformer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calm", default="configs/tiny/calm.yaml")
    ap.add_argument("--transformer", default="configs/tiny/transformer.yaml")
    ap.add_argument("--ae", default="configs/tiny/ae.yaml")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    calm = build_model(load_config(args.calm).model).eval()
    ae = build_model(load_config(args.ae).model).eval()
    tr = build_model(load_config(args.transformer).model).eval()
    if (ae.config.k, ae.config.latent_dim) != (calm.config.k, calm.config.latent_dim):
        raise SystemExit(f"{args.ae} (K={ae.config.k}, d={ae.config.latent_dim}) does not fit {args.calm}")
    vocab = min(calm.config.vocab_size, tr.config.vocab_size)
    prompt = torch.randint(3, vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    no_eos = -1  # never matches a token: every run generates exactly --tokens

    def run_calm():
        generate_calm(calm, ae, prompt, args.tokens, temperature=args.temperature, eos_id=no_eos,
                      generator=torch.Generator().manual_seed(0))

    def run_transformer():
        generate_transformer(tr, prompt, args.tokens, temperature=args.temperature, eos_id=no_eos,
                             generator=torch.Generator().manual_seed(0))

    times = {"calm": [], "transformer": []}
    with torch.no_grad():
        run_calm(), run_transformer()  # warm-up
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
            for name, fn in (("calm", run_calm), ("transformer", run_transformer)):
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) / (args.tokens * args.batch))
    per_token = {k: statistics.median(v) for k, v in times.items()}
    result = {"calm_config": args.calm, "transformer_config": args.transformer, "k": calm.config.k,
              "calm_params": count_parameters(calm)["total"], "transformer_params": count_parameters(tr)["total"],
              "tokens": args.tokens, "batch": args.batch, "temperature": args.temperature,
              "threads": torch.get_num_threads(), "seconds_per_token": per_token,
              "transformer_over_calm": per_token["transformer"] / per_token["calm"],
              "measured_at": time.strftime("%Y-%m-%d %H:%M")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generate.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
