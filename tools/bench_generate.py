"""Generation speed: wall-clock per generated token for CALM (K tokens per step) and the Transformer
baseline, same machine, same run, their ratio, CALM at T < 1 against T = 1, and where a CALM step's
time goes.

    python3 tools/bench_generate.py [--calm configs/tiny/calm.yaml] [--transformer configs/tiny/transformer.yaml]
                                    [--ae configs/tiny/ae.yaml] [--layers L] [--tokens 128] [--batch 1]
                                    [--temperatures 1 0.5] [--candidates 200] [--reference] [--rounds 5]
                                    [--clock wall|cpu] [--head-dtype bf16] [--unpacked]
                                    [--out bench_out/generate.json]

CALM-M's width and vocabulary with 4 layers (issue 18):

    python3 tools/bench_generate.py --calm configs/calm/calm_m.yaml --ae configs/ae/ae_k4_d128.yaml \\
        --transformer configs/transformer/transformer_m.yaml --layers 4 --tokens 64 --rounds 3 --reference

Models are freshly initialised (speed does not depend on the weights, except where noted below; EOS
is disabled so every run generates exactly --tokens tokens), with the KV cache, batch --batch. The
CALM head's output layer, zero at init (every sample the same), gets a random init so that
candidates differ. Every variant — the Transformer at the first temperature, CALM at each of
--temperatures, and with --reference CALM's one-row-at-a-time loop
(calm_pretrain/sampling_reference.py, the code before issue 18) at each — runs once per round, in
turn (the order rotated each round), for --rounds rounds; medians are reported, and the T < 1 / T = 1
ratios also as the median of each round's own ratio (ratios_paired_by_round). Then each CALM
variant runs once more under torch.profiler: the time per step in the generation loop's labelled
sections (generate.embed: re-embedding the chosen chunk, .backbone, .head, .decode: the AE decoder,
.choose: the sampler's bookkeeping; the reference labels embedding and backbone together), the rest
of the step as "other". At T < 1 the decoder's cost depends on how often candidates agree
(calm_pretrain/candidates.py), so with random weights it is a best case.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

from calm_pretrain.config import load_config
from calm_pretrain.head_precision import HEAD_DTYPES
from calm_pretrain.models import build_model, count_parameters
from calm_pretrain.sampling import generate_calm, generate_transformer
from calm_pretrain.sampling_reference import reference_generate_calm

LABELS = ("generate.embed", "generate.backbone", "generate.head", "generate.decode", "generate.choose")


def build(args):
    overrides = [f"model.num_layers={args.layers}"] if args.layers else []
    torch.manual_seed(0)
    calm = build_model(load_config(args.calm, overrides).model).eval()
    ae = build_model(load_config(args.ae).model).eval()
    tr = build_model(load_config(args.transformer, overrides).model).eval()
    if (ae.config.k, ae.config.latent_dim) != (calm.config.k, calm.config.latent_dim):
        raise SystemExit(f"{args.ae} (K={ae.config.k}, d={ae.config.latent_dim}) does not fit {args.calm}")
    nn.init.normal_(calm.head.final_layer.linears[2].weight, std=calm.config.init_std)
    return calm, ae, tr


def variants(args, calm, ae, tr, prompt) -> dict:
    """name → a function generating --tokens tokens (EOS disabled)."""
    no_eos = -1
    out = {"transformer": lambda: generate_transformer(tr, prompt, args.tokens, temperature=args.temperatures[0],
                                                       eos_id=no_eos, generator=torch.Generator().manual_seed(0))}
    impls = {"calm": generate_calm, **({"calm_reference": reference_generate_calm} if args.reference else {})}
    if args.head_dtype:
        impls["calm_head_" + args.head_dtype] = partial(generate_calm, head_dtype=HEAD_DTYPES[args.head_dtype])
    if args.unpacked:
        impls["calm_unpacked"] = partial(generate_calm, packed_gemm=False)
    for t in args.temperatures:
        for name, fn in impls.items():
            out[f"{name}@T={t:g}"] = (lambda fn=fn, t=t: fn(calm, ae, prompt, args.tokens, temperature=t,
                                                            num_candidates=args.candidates, eos_id=no_eos,
                                                            generator=torch.Generator().manual_seed(0)))
    return out


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CALM_VARIANTS = ("calm", "calm_reference", "calm_unpacked", *(f"calm_head_{d}" for d in HEAD_DTYPES))  # as variants() names them


def timed_rounds(fns: dict, rounds: int, per: int, clock=time.perf_counter) -> dict:
    """Each function once per round, in turn, the order rotated by one each round (so that no variant
    always runs after the same one, with its weights still in cache); median seconds per token by
    ``clock``."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    names = list(fns)
    for r in range(rounds):
        print(f"round {r + 1}/{rounds}", file=sys.stderr, flush=True)
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            t0 = clock()
            fn()
            times[name].append((clock() - t0) / per)
    return {name: {"median": statistics.median(v), "all": v} for name, v in times.items()}


def breakdown(fn, steps: int) -> dict:
    """One profiled run: milliseconds per step in each labelled section, the rest as "other"."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        total = time.perf_counter() - t0
    by_label = {e.key: e.cpu_time_total / 1e3 for e in prof.key_averages() if e.key in LABELS}
    out = {label.split(".")[1]: by_label.get(label, 0.0) / steps for label in LABELS}
    out["other"] = total * 1e3 / steps - sum(out.values())
    out["step_ms (profiled run)"] = total * 1e3 / steps
    return {k: round(v, 3) for k, v in out.items()}


def agreement(args, calm, ae, prompt, variant: dict, seeds: int = 3) -> dict:
    """Per temperature: the fraction of chunks that generate_calm(**variant) chooses as the default path
    does, from the same context (the default path's continuation so far) and the same seed, over
    --tokens tokens for each of `seeds` seeds."""
    out = {}
    for t in args.temperatures:
        same = total = 0
        for seed in range(seeds):
            kw = dict(temperature=t, num_candidates=args.candidates, eos_id=-1)
            text = generate_calm(calm, ae, prompt, args.tokens, generator=torch.Generator().manual_seed(seed), **kw)
            text = torch.stack(text) if isinstance(text, list) else text
            for i in range(args.prompt, text.shape[-1], calm.k):
                one = [generate_calm(calm, ae, text[..., :i], calm.k, generator=torch.Generator().manual_seed(seed),
                                     **kw, **v) for v in ({}, variant)]
                same += int(all(torch.equal(a, b) for a, b in zip(*one)))
                total += 1
        out[f"T={t:g}"] = {"identical_chunks": round(same / total, 4), "chunks": total}
    return out


def ratios(per_token: dict, temperatures) -> dict:
    t1 = f"{temperatures[0]:g}"
    out = {f"transformer / calm @T={t1}": per_token["transformer"] / per_token[f"calm@T={t1}"]}
    if f"calm_reference@T={t1}" in per_token:
        out[f"transformer / calm_reference @T={t1}"] = per_token["transformer"] / per_token[f"calm_reference@T={t1}"]
    for t in temperatures[1:]:
        for impl in CALM_VARIANTS:
            if f"{impl}@T={t:g}" in per_token:
                out[f"{impl} T={t:g} / T={t1}"] = per_token[f"{impl}@T={t:g}"] / per_token[f"{impl}@T={t1}"]
    return {k: round(v, 3) for k, v in out.items()}


def paired_ratios(timed: dict, temperatures) -> dict:
    """The same ratios as :func:`ratios`, taken within each round and then the median over rounds: the
    machine's speed drifts from round to round (other jobs, clocks), and a ratio of two runs made
    seconds apart cancels most of that drift."""
    t1 = f"{temperatures[0]:g}"
    out = {}
    for t in temperatures[1:]:
        for impl in CALM_VARIANTS:
            if f"{impl}@T={t:g}" in timed:
                pairs = zip(timed[f"{impl}@T={t:g}"]["all"], timed[f"{impl}@T={t1}"]["all"])
                out[f"{impl} T={t:g} / T={t1}"] = round(statistics.median(a / b for a, b in pairs), 3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calm", default="configs/tiny/calm.yaml")
    ap.add_argument("--transformer", default="configs/tiny/transformer.yaml")
    ap.add_argument("--ae", default="configs/tiny/ae.yaml")
    ap.add_argument("--layers", type=int, default=0, help="override num_layers of both backbones (0: as configured)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.5],
                    help="the first is the Transformer's and the reference for the CALM ratios")
    ap.add_argument("--candidates", type=int, default=200, help="batch sampler candidates per chunk at T < 1")
    ap.add_argument("--reference", action="store_true", help="also time the one-row-at-a-time loop (before)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                    help="timed rounds by wall clock, or by this process's CPU time (not counting the time other "
                         "jobs hold the cores; the per-step breakdown stays in wall time)")
    ap.add_argument("--head-dtype", choices=tuple(HEAD_DTYPES), default=None,
                    help="also time CALM with the opt-in low-precision head (not exact), and measure how often it "
                         "chooses the fp32 head's chunk")
    ap.add_argument("--unpacked", action="store_true",
                    help="also time CALM with packed_gemm=False (F.linear's kernel at T < 1), and measure how often "
                         "it chooses the default path's chunk")
    ap.add_argument("--out", default="bench_out/generate.json")
    args = ap.parse_args(argv)

    calm, ae, tr = build(args)
    vocab = min(calm.config.vocab_size, tr.config.vocab_size)
    prompt = torch.randint(3, vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    fns = variants(args, calm, ae, tr, prompt)
    with torch.no_grad():
        timed = timed_rounds(fns, args.rounds, args.tokens * args.batch, CLOCKS[args.clock])
        steps = -(-args.tokens // calm.k)
        parts = {name: breakdown(fn, steps) for name, fn in fns.items() if name.startswith("calm")}
        agree = {}
        if args.head_dtype:
            agree["head_dtype_agreement"] = agreement(args, calm, ae, prompt, {"head_dtype": HEAD_DTYPES[args.head_dtype]})
        if args.unpacked:
            agree["unpacked_agreement"] = agreement(args, calm, ae, prompt, {"packed_gemm": False})
    per_token = {name: t["median"] for name, t in timed.items()}
    result = {"calm_config": args.calm, "transformer_config": args.transformer, "ae_config": args.ae,
              "layers": args.layers or calm.config.num_layers, "hidden_size": calm.config.hidden_size,
              "vocab_size": calm.config.vocab_size, "k": calm.config.k,
              "calm_params": count_parameters(calm)["total"], "ae_params": count_parameters(ae)["total"],
              "transformer_params": count_parameters(tr)["total"], "tokens": args.tokens, "prompt": args.prompt,
              "batch": args.batch, "candidates": args.candidates, "rounds": args.rounds, "clock": args.clock,
              "threads": torch.get_num_threads(), "seconds_per_token": per_token,
              "seconds_per_token_all_rounds": {n: t["all"] for n, t in timed.items()},
              "ratios": ratios(per_token, args.temperatures),
              "ratios_paired_by_round": paired_ratios(timed, args.temperatures), "breakdown_ms_per_step": parts,
              **agree,
              "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
