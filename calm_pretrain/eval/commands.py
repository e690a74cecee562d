"""`calm-pretrain eval` and `calm-pretrain generate`: score or sample any release, run or checkpoint."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from calm_pretrain.eval.source import SourceError, eval_blocks, load_source, published_eval_set
from calm_pretrain.head_precision import HEAD_DTYPES
from calm_pretrain.models.registry import spec_of
from data_pipeline.files import atomic_write_json

SCORE_ROWS = [("brierlm", "BrierLM (x100)")] + [(f"brier_{n}", f"Brier-{n}") for n in range(1, 5)] + [
    ("energy_skill", "energy skill"), ("energy_score", "energy score (model)"),
    ("marginal_energy_score", "energy score (marginal)"), ("token_accuracy", "decoded-token accuracy"),
    ("accuracy", "reconstruction accuracy")] + [(f"accuracy_noise_{s:g}", f"  latent noise sigma={s:g}")
                                                 for s in (0.1, 0.2, 0.3, 0.5)]


def add_eval_arguments(p) -> None:
    p.add_argument("source", help="a release directory (ours or the published layout), a run directory or a checkpoint")
    p.add_argument("--data", nargs="+", help="eval set: text inputs (jsonl, jsonl.zst, parquet, txt) or a token shard "
                   "directory (default with --published: $CALM_WIKITEXT103_TEST)")
    p.add_argument("--block-tokens", type=int, help="tokens per block (default: the model's trained context; "
                   "--published: 8192 for CALM, 2048 for the Transformer)")
    p.add_argument("--published", action="store_true", help="the published protocol: WikiText-103 test documents, "
                   "the published block sizes")
    p.add_argument("--max-blocks", type=int, default=0, help="score only the first N blocks (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draws", type=int, default=1, help="Brier-n from this many independent sample draws per "
                   "block, pooled (the published protocol: 1); lowers the sampling noise of Brier-3 and -4")
    p.add_argument("--ae", help="the CALM's autoencoder directory (when the release does not embed one)")
    p.add_argument("--tokenizer", help="tokenizer for text inputs (default: the one saved with the release)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--json", help="write every number and the protocol to this file")


def _table(result: dict) -> str:
    lines = [f"{'score':<28} {'value':>10}  {'± s.e.':>8}"]
    for key, label in SCORE_ROWS:
        if key in result:
            se = result.get(f"{key}_se")
            lines.append(f"{label:<28} {result[key]:>10.6f}  {'' if se is None else f'{se:8.6f}'}")
    return "\n".join(lines)


def cmd_eval(args) -> int:
    from calm_pretrain.eval.heldout import evaluate_model

    try:
        src = load_source(args.source, args.ae, args.tokenizer)
        spec = spec_of(src.model.config)
        block = args.block_tokens or (spec.published_block_tokens if args.published else src.context_tokens)
        k = src.model.config.tokens_per_position
        if block % k:
            raise SourceError(f"--block-tokens {block} is not a multiple of the model's K = {k}")
        if args.draws < 1:
            raise SourceError(f"--draws {args.draws}: at least 1")
        data = args.data or ([published_eval_set()] if args.published else None)
        if not data:
            raise SourceError("no eval set: pass --data (text inputs or token shards) or --published")
        blocks, eval_set = eval_blocks(data, src.tokenizer, block, args.max_blocks, args.text_field)
    except SourceError as e:
        print(f"eval error: {e}", file=sys.stderr)
        return 2
    print(f"{src.description}\neval set {', '.join(data)}: {eval_set['blocks']} blocks of {block} tokens "
          f"(ids {eval_set['ids_fingerprint']}), seed {args.seed}, {args.draws} draw(s)", flush=True)
    t0 = time.perf_counter()
    result = evaluate_model(src.model, _progress(blocks, block), ae=src.ae, seed=args.seed, draws=args.draws)
    seconds = time.perf_counter() - t0
    print(_table(result))
    print(f"{eval_set['tokens']:,} tokens in {seconds:.1f} s ({eval_set['tokens'] / seconds:,.0f} tokens/s)")
    if args.json:
        atomic_write_json(Path(args.json), {"source": str(args.source), "arch": src.arch, "seed": args.seed,
                                             "draws": args.draws, "eval_set": eval_set,
                               "protocol": "published" if args.published else "custom", "seconds": seconds,
                               "scores": result})
        print(f"wrote {args.json}")
    return 0


def _progress(blocks: list, block_tokens: int):
    """The blocks, with a progress bar on stderr each time a scoring pass goes through them."""
    from tqdm import tqdm

    class Blocks(list):
        def __iter__(self):
            return iter(tqdm(list.__iter__(self), total=len(self), unit="tok", unit_scale=block_tokens,
                             leave=False, file=sys.stderr, disable=None))
    return Blocks(blocks)


def add_generate_arguments(p) -> None:
    p.add_argument("source", help="a release directory, a run directory or a checkpoint (CALM or Transformer)")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for several)")
    p.add_argument("--prompt-file", help="a file with one prompt per line")
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--sampler", choices=["batch", "exact"], default="batch",
                   help="CALM: the batch approximation (T = 1/n) or the exact rejection sampler (any T in (0, 1])")
    p.add_argument("--candidates", type=int, default=200, help="CALM batch sampler: head samples per chunk")
    p.add_argument("--top-p", type=float, default=1.0, help="Transformer: nucleus sampling")
    p.add_argument("--head-dtype", choices=sorted(HEAD_DTYPES), default=None,
                   help="CALM (energy head): run the head in bf16 — faster at T < 1 on CPUs with bf16 matmul, "
                        "not exact: some chunks differ from the fp32 head's (docs/performance.md, 'Generation')")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=1, help="continuations per prompt")
    p.add_argument("--batch-size", type=int, default=8,
                   help="continuations sampled together (prompts of one token length share a batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ae", help="the CALM's autoencoder directory (when the release does not embed one)")
    p.add_argument("--tokenizer", help="tokenizer (default: the one saved with the release)")


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += [line.rstrip("\n") for line in Path(args.prompt_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise SourceError("no prompt: pass --prompt TEXT or --prompt-file FILE")
    if any(not p.strip() for p in prompts):
        raise SourceError("an empty prompt has nothing to condition on")
    return prompts


def cmd_generate(args) -> int:
    from calm_pretrain.eval.generation import generate

    try:
        prompts = _prompts(args)
        src = load_source(args.source, args.ae, args.tokenizer)
        spec = spec_of(src.model.config)
        if spec.generate is None:
            raise SourceError(f"{args.source}: a {spec.arch} model does not generate text")
        if src.tokenizer is None:
            raise SourceError(f"{args.source}: no tokenizer saved with it: pass --tokenizer")
        if args.head_dtype and not spec.uses_autoencoder:
            raise SourceError(f"--head-dtype: a {spec.arch} model has no generative head")
        if spec.max_temperature is not None and not 0 < args.temperature <= spec.max_temperature:
            raise SourceError(f"--temperature {args.temperature}: the {spec.arch} sampler needs T in "
                              f"(0, {spec.max_temperature:g}]")
    except SourceError as e:
        print(f"generate error: {e}", file=sys.stderr)
        return 2
    if args.batch_size < 1 or args.num_samples < 1:
        print("generate error: --batch-size and --num-samples must be >= 1", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(args.seed)
    tok = src.tokenizer
    encoded = [tok.encode(prompt) for prompt in prompts]
    batches = _batches(encoded, args.num_samples, args.batch_size)
    stream = len(batches) == 1 and len(batches[0]) == 1  # one continuation: print it as it is decoded
    results: dict[tuple[int, int], list[int]] = {}
    total_new, steps, t0 = 0, 0, time.perf_counter()
    for rows in batches:
        ids = torch.tensor([encoded[p] for p, _ in rows], dtype=torch.long)
        try:
            outs, backbone_steps = generate(src.model, src.ae, ids, args.max_new_tokens, args.temperature,
                                            sampler=args.sampler, candidates=args.candidates, top_p=args.top_p,
                                            head_dtype=HEAD_DTYPES.get(args.head_dtype), generator=gen,
                                            on_tokens=_streamer(tok, prompts[rows[0][0]]) if stream else None)
        except ValueError as e:
            print(f"\ngenerate error: {e}", file=sys.stderr)
            return 2
        steps += backbone_steps * len(rows)  # each backbone step advances every row of the batch
        for row, out in zip(rows, outs):
            results[row] = out
            total_new += len(out) - len(encoded[row[0]])
    if stream:
        print(flush=True)
    else:
        for p, prompt in enumerate(prompts):
            print(f"### {prompt}")
            for i in range(args.num_samples):
                print(f"[{i}] {tok.decode(results[(p, i)])}", flush=True)
    seconds = time.perf_counter() - t0
    rows = sum(len(b) for b in batches)
    per_token = f", {steps / max(total_new, 1):.2f} backbone steps per generated token" if spec.uses_autoencoder else ""
    print(f"-- {total_new} new tokens in {seconds:.1f} s ({total_new / seconds:,.1f} tokens/s{per_token}; "
          f"{rows} continuations in {len(batches)} batches)", file=sys.stderr)
    return 0


def _batches(encoded: list[list[int]], num_samples: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """(prompt index, sample index) rows grouped into batches of at most `batch_size`; a batch holds prompts
    of one token length only, so no row carries padding the model would read as text."""
    by_length: dict[int, list[tuple[int, int]]] = {}
    for p, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).extend((p, i) for i in range(num_samples))
    return [rows[i:i + batch_size] for rows in by_length.values() for i in range(0, len(rows), batch_size)]


def _streamer(tok, prompt):
    """Prints the prompt once, then the text of each decoded chunk as it arrives."""
    if prompt is not None:
        print(f"### {prompt}", flush=True)
    seen: list[int] = []

    def on_tokens(new_ids: list[int]) -> None:
        before = tok.decode(seen)
        seen.extend(new_ids)
        print(tok.decode(seen)[len(before):], end="", flush=True)
    return on_tokens
