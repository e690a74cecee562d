"""Trainer benchmark: a few steps of any config on this device → step time, tokens/s, MFU, peak memory,
and the trainer's overhead against a bare PyTorch loop over the same model and batches.

    python3 tools/bench_trainer.py --config configs/tiny/calm.yaml [overrides] [--steps 20] [--bare]
                                   [--versus train.compile=true ...]

Batches are synthetic (random token ids; for CALM random posteriors) and held in memory, so the figure
is the model + trainer, not the data pipeline (tools/bench_data.py measures that). With --bare the
trainer and a bare loop (forward, backward, clip, AdamW; nothing else) alternate in rounds over the
same model shape and seed; the ratio of their median step times is reported from this one run. With
--versus OVERRIDES the trainer also runs with those overrides added, alternated the same way, and the
ratio of the two medians (variant / base) is reported.
Results are printed and written as JSON to bench_out/trainer_<name>.json.
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
from calm_pretrain.models import build_model, spec_of
from calm_pretrain.models.registry import training_flops_per_token
from calm_pretrain.parallel.plan import apply_activation_checkpointing, apply_compile
from calm_pretrain.train.hardware import peak_flops
from calm_pretrain.train.trainer import Callback, Trainer, model_loss, peak_memory_gb


def synthetic_batches(cfg, count: int, device) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    example = spec_of(cfg.model).example_batch
    batches = [example(cfg.model, cfg.train.micro_batch_size, cfg.data.seq_chunks, gen) for _ in range(count)]
    return [{key: v.to(device) for key, v in b.items()} for b in batches]


def _cycle(batches):
    while True:
        yield from batches


class _StepClock(Callback):
    """Each step's wall time as the host sees it (the device synchronised first on a GPU): the trainer's
    own step_time is a log window's mean, and this benchmark keeps one long window."""

    def __init__(self, device):
        self.device, self.times, self.last = device, [], None

    def on_train_start(self, trainer) -> None:
        self.last = time.perf_counter()

    def on_step_end(self, trainer, record) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now


def time_trainer(cfg, batches, steps: int, device, out_dir: Path) -> list[float]:
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.train.compile:  # as `calm-pretrain train` plans it (the warm-up steps compile)
        apply_compile(model)
    clock = _StepClock(device)
    Trainer(cfg, model, _cycle(batches), out_dir, log=lambda s: None, callbacks=[clock]).fit(steps)
    return clock.times


def time_bare(cfg, batches, steps: int, device) -> list[float]:
    """The same work with nothing around it: forward, backward, clip, AdamW, zero_grad."""
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay,
                            fused=device.type == "cuda")
    it = _cycle(batches)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        for _ in range(t.grad_accum_steps):
            loss, _ = model_loss(model.config, model, next(it))
            (loss / t.grad_accum_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="alternating trainer/bare rounds (with --bare)")
    p.add_argument("--bare", action="store_true", help="also time a bare PyTorch loop and report the ratio")
    p.add_argument("--versus", nargs="+", default=[], metavar="OVERRIDE",
                   help="also time the trainer with these overrides added (alternated rounds) and report the ratio")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--sdpa", choices=["auto", "flash", "efficient", "math"], default="auto",
                   help="restrict scaled_dot_product_attention to one kernel (flash: fails where it cannot run)")
    args = p.parse_args(argv)
    if args.sdpa == "auto":
        return _bench(args)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "math": SDPBackend.MATH}[args.sdpa]
    with sdpa_kernel(backend):
        return _bench(args)


def _bench(args) -> int:

    cfg = load_config(args.config, [*args.overrides, "train.wandb=off", f"train.log_every={10**6}"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches = synthetic_batches(cfg, 4 * cfg.train.grad_accum_steps, device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * batches[0]["ids"].shape[1]

    versus = load_config(args.config, [*args.overrides, *args.versus, "train.wandb=off",
                                       f"train.log_every={10**6}"]) if args.versus else None
    trainer_times, bare_times, versus_times, first_steps = [], [], [], {"base": [], "versus": []}
    for r in range(args.rounds if args.bare or versus else 1):
        print(f"round {r + 1}: trainer ...", file=sys.stderr, flush=True)
        times = time_trainer(cfg, batches, args.steps + args.warmup, device, out_dir / "run")
        trainer_times += times[args.warmup:]
        first_steps["base"].append(times[0])
        if versus:
            print(f"round {r + 1}: trainer with {' '.join(args.versus)} ...", file=sys.stderr, flush=True)
            times = time_trainer(versus, batches, args.steps + args.warmup, device, out_dir / "run")
            versus_times += times[args.warmup:]
            first_steps["versus"].append(times[0])
        if args.bare:
            print(f"round {r + 1}: bare loop ...", file=sys.stderr, flush=True)
            bare_times += time_bare(cfg, batches, args.steps + args.warmup, device)[args.warmup:]

    step = statistics.median(trainer_times)
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    peak, source = peak_flops(device, bf16, cfg.train.peak_flops)
    flops = training_flops_per_token(cfg.model, cfg.data.seq_chunks).total
    result = {"config": args.config, "overrides": args.overrides, "device": str(device),
              "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "steps": len(trainer_times), "step_time_s": step,
              "tokens_per_step": tokens_per_step, "tokens_per_s": tokens_per_step / step,
              "flops_per_token": flops, "peak_flops": peak, "peak_source": source,
              "mfu": tokens_per_step / step * flops / peak if peak else None,
              "peak_memory_gb": peak_memory_gb(device), "sdpa": args.sdpa,
              "measured_at": time.strftime("%Y-%m-%d %H:%M")}
    if versus:
        result.update(versus=args.versus, versus_step_time_s=statistics.median(versus_times),
                      versus_over_base=statistics.median(versus_times) / step,
                      first_step_s=first_steps)  # per round: the first round's compiles, later ones hit the cache
    if args.bare:
        bare = statistics.median(bare_times)
        result.update(bare_step_time_s=bare, trainer_over_bare=step / bare)
    (out_dir / f"trainer_{cfg.name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
