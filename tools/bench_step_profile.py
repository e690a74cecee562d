"""Where a CALM training step's time goes: the step split into its parts, each timed on its own in the
same run, on the same batch, with the parts alternated round by round (medians).

    python3 tools/bench_step_profile.py [--config configs/tiny/calm.yaml] [overrides] [--rounds 7]
                                        [--published-dims] [--compile] [--out docs/step_profile.json]

`--published-dims` sets the published code's tiny dims (vocab 8192, hidden 256, 4 layers, K = 4,
latent 128, N = 8 head samples, M = 100 target samples, batch 4 × 512 tokens). The parts:

  step       the whole step: forward, backward, clip, AdamW, zero_grad
  backbone   token embedding + chunk compression + the transformer layers, forward and backward
             (the backward seeded with a fixed random gradient of the hidden states' shape)
  head       the energy head's N sample passes from fixed hidden states, forward and backward
  loss       the energy score of fixed head samples against M posterior targets, forward and backward
  optimizer  gradient clipping + AdamW step + zero_grad, the gradients set beforehand

"other" is step − the parts: autograd glue between them, the loss's mean, allocation. Data loading is
not in the step (the loader runs ahead in its own thread; tools/bench_data.py measures its headroom).
One thread (torch.set_num_threads(1)) unless --threads. Writes JSON.
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
from calm_pretrain.losses import energy_loss
from calm_pretrain.models import build_model, spec_of
from calm_pretrain.train.trainer import model_loss

PUBLISHED_DIMS = ["model.vocab_size=8192", "model.hidden_size=256", "model.intermediate_size=768",
                  "model.num_layers=4", "model.k=4", "model.latent_dim=128", "model.head.num_samples=8",
                  "model.head.num_target_samples=100", "data.seq_chunks=128", "train.micro_batch_size=4"]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def parts(cfg, compile_blocks: bool):
    """{part name: a function running that part once} over one model and one fixed batch."""
    torch.manual_seed(0)
    model = build_model(cfg.model)
    if compile_blocks:
        from calm_pretrain.parallel.plan import apply_compile

        apply_compile(model)
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)
    gen = torch.Generator().manual_seed(0)
    batch = spec_of(cfg.model).example_batch(cfg.model, t.micro_batch_size, cfg.data.seq_chunks, gen)
    k, head = model.config.k, model.head
    ids, mu, log_sigma = batch["ids"], batch["mu"][:, 1:], batch["log_sigma"][:, 1:]
    with torch.no_grad():
        h_fixed = model.hidden_states(ids[:, :-k])
        samples_fixed = head.sample(h_fixed, head.cfg.num_samples)
    grad_h = torch.randn_like(h_fixed)
    grad_samples = torch.randn_like(samples_fixed)

    def step():
        loss, _ = model_loss(cfg.model, model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def backbone():
        model.hidden_states(ids[:, :-k]).backward(grad_h)
        model.zero_grad(set_to_none=True)

    def head_passes():
        head.sample(h_fixed.detach().requires_grad_(), head.cfg.num_samples).backward(grad_samples)
        model.zero_grad(set_to_none=True)

    def loss_only():
        x = samples_fixed.detach().requires_grad_()
        energy_loss(x, mu, log_sigma, num_target_samples=head.cfg.num_target_samples, alpha=head.cfg.alpha,
                    chunk_positions=head.cfg.loss_chunk_positions).mean().backward()

    def optimizer():
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e-3)
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, {"step": step, "backbone": backbone, "head": head_passes, "loss": loss_only, "optimizer": optimizer}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny/calm.yaml")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--published-dims", action="store_true")
    ap.add_argument("--compile", action="store_true", help="train.compile's plan applied to the model")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench_out/step_profile.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [*(PUBLISHED_DIMS if args.published_dims else []), *args.overrides])
    model, fns = parts(cfg, args.compile)
    for _ in range(args.warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for r in range(args.rounds):
        for name, fn in fns.items():
            times[name].append(_timed(fn))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {v[-1]:.3f}s" for n, v in times.items()),
              file=sys.stderr, flush=True)
    med = {name: statistics.median(v) for name, v in times.items()}
    tokens = cfg.train.micro_batch_size * cfg.data.seq_chunks * cfg.model.k
    share = {name: med[name] / med["step"] for name in fns if name != "step"}
    result = {"config": args.config, "overrides": (PUBLISHED_DIMS if args.published_dims else []) + args.overrides,
              "compile": args.compile, "threads": args.threads, "rounds": args.rounds,
              "parameters": sum(p.numel() for p in model.parameters()), "tokens_per_step": tokens,
              "median_s": med, "share_of_step": share, "other_s": med["step"] - sum(med[n] for n in share),
              "tokens_per_s": tokens / med["step"], "measured_at": time.strftime("%Y-%m-%d %H:%M")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
