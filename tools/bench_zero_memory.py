"""Peak memory per process of one training step at ZeRO-1 and at ZeRO-3 (2 CPU processes, gloo).

    python3 tools/bench_zero_memory.py [--config configs/calm/calm_m.yaml] [--precision fp32] [--stages 1 3]

Each stage runs in its own pair of processes: build the model (inside deepspeed.zero.Init for ZeRO-3),
wrap it in the DeepSpeed engine, run one optimizer step on a synthetic micro-batch, report every
rank's peak resident set size and the bytes of live tensors just before and after the step.

The prediction is the per-parameter arithmetic of the ZeRO paper for Ψ parameters on N ranks with
mixed precision: 2-byte weights, 2-byte gradients, 12 bytes of fp32 master weights and Adam moments,
each term whole or divided by N depending on the stage. The paper's ZeRO-1 keeps whole gradients
(2Ψ + 2Ψ + 12Ψ/N; ZeRO-3 16Ψ/N: a saving of 4Ψ(1 − 1/N)). DeepSpeed's stage 1 does not at the
moment that decides the peak: at the end of the accumulation window it reduces each gradient into
its owner's partition and frees the rest, so when the step runs ZeRO-1 holds 2Ψ + 2Ψ/N + 4Ψ/N
(+ 8Ψ/N of moments created in the step) and ZeRO-3 2Ψ/N + 2Ψ/N + 4Ψ/N (+ 8Ψ/N): the step's
saving is the weights' 2Ψ(1 − 1/N). Both are reported; the live-tensor census checks which buffers
each stage holds. In fp32 (the CPU default) weights and gradients take 4 bytes each, and DeepSpeed
still keeps a separate fp32 copy of each partition. Results go to <out>/zero_memory.json.

Peak RSS is a high-water mark, so large buffers are allocated with mmap (MALLOC_MMAP_THRESHOLD_) and
go back to the OS when freed, instead of lingering in the heap and inflating later peaks.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import socket
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def live_tensor_gib() -> float:
    """Bytes of every distinct tensor storage Python can reach in this process: what the stage holds,
    without the allocator's or the runtime's share of RSS."""
    seen, total = set(), 0
    with warnings.catch_warnings():  # isinstance() on some of the library objects gc returns warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        if obj.device.type == "cpu":
            storage = obj.untyped_storage()
            if storage.data_ptr() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total / 2**30


def _rank(rank, world, port, config, overrides, out):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})
    torch.set_num_threads(1)
    from calm_pretrain.config import load_config
    from calm_pretrain.models import build_model, spec_of
    from calm_pretrain.parallel.distributed import init_distributed
    from calm_pretrain.parallel.engine import DeepSpeedEngine, build_model_sharded
    from calm_pretrain.parallel.plan import mark_zero3_leaves
    from calm_pretrain.train.trainer import model_loss

    init_distributed()
    cfg = load_config(config, overrides)
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # noqa: E731 - GiB
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = build_model_sharded(cfg, lambda: build_model(cfg.model), world)
    if cfg.train.zero_stage == 3:
        mark_zero3_leaves(model)
    after_build = rss()
    engine = DeepSpeedEngine(model, cfg, world)
    after_init = rss()
    batch = spec_of(cfg.model).example_batch(cfg.model, 1, cfg.data.seq_chunks, torch.Generator().manual_seed(0))
    if cfg.train.precision == "bf16":
        batch = {k: v.bfloat16() if v.is_floating_point() else v for k, v in batch.items()}
    seen = {}

    def loss_fn(forward, b):
        out = model_loss(cfg.model, forward, b)
        seen["after_forward"] = rss()
        return out

    ds_step = engine.engine.step  # with one micro-batch, DeepSpeed's step() is the window's update

    def measured_step(*args, **kwargs):
        seen["after_backward"], seen["live_before_step"] = rss(), live_tensor_gib()
        return ds_step(*args, **kwargs)

    engine.engine.step = measured_step
    result = engine.step(iter([batch]), 1e-4, loss_fn)
    loss_value, grad_norm, applied = float(result.loss), result.grad_norm, result.applied
    after_forward, after_backward, live_before_step = seen["after_forward"], seen["after_backward"], seen["live_before_step"]
    live_after_step = live_tensor_gib()
    record = {"rank": rank, "zero_stage": cfg.train.zero_stage, "peak_rss_gib": rss(), "rss_after_build_gib": after_build,
              "rss_after_engine_gib": after_init,
              "rss_after_forward_gib": after_forward, "rss_after_backward_gib": after_backward, "loss": loss_value,
              "live_tensors_before_step_gib": live_before_step, "live_tensors_after_step_gib": live_after_step, "grad_norm": grad_norm, "applied": applied,
              "seconds": time.perf_counter() - t0,
              "parameters": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())}
    Path(out).with_suffix(f".rank{rank}.json").write_text(json.dumps(record))


def run_stage(config, overrides, world, out: Path) -> list[dict]:
    port = _port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, world, port, config, overrides, str(out))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise SystemExit(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
    return [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(world)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/calm/calm_m.yaml")
    ap.add_argument("--precision", default="fp32", choices=["bf16", "fp32"])
    ap.add_argument("--seq-chunks", type=int, default=8)
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))  # read by each spawned rank at start
    results = {}
    for stage in args.stages:
        print(f"ZeRO-{stage}: {args.world_size} processes, one step of {args.config} ({args.precision}) ...",
              file=sys.stderr, flush=True)
        overrides = [f"train.zero_stage={stage}", f"train.precision={args.precision}", "train.micro_batch_size=1",
                     f"data.seq_chunks={args.seq_chunks}", "train.grad_accum_steps=1"]
        results[stage] = run_stage(args.config, overrides, args.world_size, out / f"zero{stage}")
        for r in results[stage]:
            print(f"  rank {r['rank']}: peak RSS {r['peak_rss_gib']:.2f} GiB (after build {r['rss_after_build_gib']:.2f}, "
                  f"engine {r['rss_after_engine_gib']:.2f}, forward {r['rss_after_forward_gib']:.2f}, "
                  f"backward {r['rss_after_backward_gib']:.2f}), live tensors {r['live_tensors_before_step_gib']:.2f} GiB "
                  f"before the step, {r['live_tensors_after_step_gib']:.2f} after, {r['seconds']:.0f}s",
                  file=sys.stderr, flush=True)
    summary = {"config": args.config, "precision": args.precision, "world_size": args.world_size,
               "measured_at": time.strftime("%Y-%m-%d %H:%M"), "results": results}
    if 1 in results and 3 in results:
        psi = results[1][0]["parameters"]
        n = args.world_size
        per = 2 if args.precision == "bf16" else 4
        predicted = 2 * per * psi * (1 - 1 / n) / 2**30  # the paper's ZeRO-1 (whole gradients) vs ZeRO-3
        at_step = per * psi * (1 - 1 / n) / 2**30  # DeepSpeed's stage 1 at the step: only the weights whole
        measured = (max(r["peak_rss_gib"] for r in results[1]) - max(r["peak_rss_gib"] for r in results[3]))
        live = {when: max(r[f"live_tensors_{when}_step_gib"] for r in results[1])
                - max(r[f"live_tensors_{when}_step_gib"] for r in results[3]) for when in ("before", "after")}
        summary.update(parameters=psi, predicted_saving_gib=predicted, measured_saving_gib=measured,
                       measured_over_predicted=measured / predicted, predicted_saving_at_step_gib=at_step,
                       measured_over_predicted_at_step=measured / at_step,
                       live_tensor_saving_before_step_gib=live["before"], live_tensor_saving_after_step_gib=live["after"])
        print(f"live tensor bytes: ZeRO-3 holds {live['before']:.2f} GiB less before the step, "
              f"{live['after']:.2f} GiB less after it", file=sys.stderr)
        print(f"parameters {psi:,}: ZeRO-3 lowers the peak by {measured:.2f} GiB per process; the per-parameter "
              f"arithmetic predicts {at_step:.2f} GiB for the buffers held at the step (ratio "
              f"{measured / at_step:.2f}), {predicted:.2f} GiB for the paper's ZeRO-1 with whole gradients "
              f"(ratio {measured / predicted:.2f})", file=sys.stderr)
    (out / "zero_memory.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
