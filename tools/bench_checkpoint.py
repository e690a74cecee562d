"""Checkpoint save and resume against DeepSpeed's bare save_checkpoint / load_checkpoint (same run).

    python3 tools/bench_checkpoint.py [--config configs/calm/calm_m.yaml] [--reps 4] [--out bench_out]
        [--dir /tmp/bench_ckpt] [--override model.num_layers=8 ...]

Two CPU processes (gloo), ZeRO-1, fp32: build the model, one optimizer step on a synthetic micro-batch
(so the Adam moments exist), then, alternating for --reps rounds:

  (a) bare:  engine.save_checkpoint(dir, tag) and engine.load_checkpoint(dir, tag)
  (b) ours:  Checkpointer.save (hashing, manifest, rename, `latest`) and the resume path: a fresh
             Checkpointer's find_resumable() (verification), the engine's load (safe_load allow-list)
             and the RNG states; and DeepSpeed's bare load_checkpoint of that same checkpoint
             ("bare_load_ours"), the two loads in alternating order
  (c) async, after the rounds above: a synchronous Checkpointer.save, then one with background=True: the time training is blocked (the state copied to
             host memory), then --steps training steps while the files are written, then the wait
             for the commit; and --steps steps with no save in flight, for comparison. One
             Checkpointer for all rounds (keep_last=1), as in a run: the first round allocates the
             host buffers, the later ones reuse them

each timed between barriers (the slowest rank decides). Reported: the median of each, and the ratios
ours/bare for save and resume (target <= 1.15). The same script run with PYTHONPATH naming another
checkout measures that checkout's Checkpointer (the "before" figure). Checkpoints go under --dir and
are deleted after each round. Results: <out>/checkpoint_bench.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(fn) -> float:
    from calm_pretrain.parallel.distributed import barrier

    barrier()
    t0 = time.perf_counter()
    fn()
    barrier()
    return time.perf_counter() - t0


def _engine(config, overrides, world):
    from calm_pretrain.config import load_config
    from calm_pretrain.models import build_model, spec_of
    from calm_pretrain.parallel.engine import DeepSpeedEngine
    from calm_pretrain.train.trainer import model_loss

    cfg = load_config(config, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    engine = DeepSpeedEngine(model, cfg, world)
    batch = spec_of(cfg.model).example_batch(cfg.model, 1, cfg.data.seq_chunks, torch.Generator().manual_seed(0))

    def step():
        engine.step(iter([batch]), 1e-4, lambda forward, b: model_loss(cfg.model, forward, b))

    step()
    return cfg, engine, sum(p.numel() for p in model.parameters()), step


def _rank(rank, world, port, config, overrides, reps, root, out, steps, parts):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})
    torch.set_num_threads(1)
    from calm_pretrain.parallel.distributed import barrier, init_distributed
    from calm_pretrain.parallel.groups import ParallelLayout
    from calm_pretrain.train.checkpoint import Checkpointer

    init_distributed()
    t0 = time.perf_counter()
    cfg, engine, params, train_step = _engine(config, overrides, world)
    built = time.perf_counter() - t0
    root = Path(root)
    layout = ParallelLayout.of_run(cfg.parallel, world)
    times = {"bare_save": [], "bare_load": [], "save": [], "resume": [], "resume_choose": [], "bare_load_ours": [],
             "sync_save": [], "async_blocked": [], "steps_while_writing": [], "async_wait": [], "steps_alone": []}
    quiet = lambda s: None  # noqa: E731
    bare_load = lambda d, tag: engine.engine.load_checkpoint(  # noqa: E731
        str(d), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
    for i in range(reps if "resume" in parts else 0):
        bare = root / "bare"
        times["bare_save"].append(_timed(lambda: engine.engine.save_checkpoint(str(bare), tag=f"t{i}", save_latest=False)))
        times["bare_load"].append(_timed(lambda: bare_load(bare, f"t{i}")))
        barrier()
        if rank == 0:
            shutil.rmtree(bare)
        ours = Checkpointer(root / "ours", keep_last=100, rank=rank, world_size=world, log=quiet)
        times["save"].append(_timed(lambda: ours.save(i + 1, engine, {"bench": i})))

        def resume():
            t = time.perf_counter()
            path = Checkpointer(root / "ours", keep_last=100, rank=rank, world_size=world, log=quiet).find_resumable()
            barrier()
            times["resume_choose"].append(time.perf_counter() - t)  # of which: choosing (verification)
            engine.load(path / "engine", layout)
            ours.load_rng(path)

        # the same checkpoint loaded both ways, the order alternating (the second load finds more in cache)
        last = root / "ours" / f"step_{i + 1:08d}" / "engine"
        for variant in (("resume", "bare_load_ours") if i % 2 == 0 else ("bare_load_ours", "resume")):
            times[variant].append(_timed(resume if variant == "resume" else lambda: bare_load(last.parent, last.name)))
        barrier()
        if rank == 0:
            shutil.rmtree(root / "ours")
        barrier()
    # Background saves after the rounds above (their host buffers, one more copy of the state, would
    # otherwise crowd the page cache the loads read from). One Checkpointer for every round, as in a run:
    # the first save allocates the host buffers, the later ones reuse them.
    background = Checkpointer(root / "async", keep_last=1, rank=rank, world_size=world, log=quiet)
    for i in range(reps if "async" in parts else 0):
        times["sync_save"].append(_timed(lambda: background.save(2000 + i, engine, {"bench": i})))  # the same, waited for
        times["async_blocked"].append(_timed(lambda: background.save(1000 + i, engine, {"bench": i}, background=True)))
        times["steps_while_writing"].append(_timed(lambda: [train_step() for _ in range(steps)]))
        times["async_wait"].append(_timed(lambda: background.finish_pending(wait=True)))
        times["steps_alone"].append(_timed(lambda: [train_step() for _ in range(steps)]))
    if rank == 0:
        import calm_pretrain

        Path(out).write_text(json.dumps({"times_s": times, "parameters": params, "build_and_step_s": built,
                                         "calm_pretrain": str(Path(calm_pretrain.__file__).parent)}))


def order_balanced(times: dict) -> dict:
    """resume / bare_load_ours per round, by which of the two loads went first (the second finds more of
    the checkpoint in the page cache), the median of each order, and their geometric mean: the ratio
    with the order's effect cancelled."""
    pairs = list(zip(times["resume"], times["bare_load_ours"]))
    first = [r / b for i, (r, b) in enumerate(pairs) if i % 2 == 0]  # even rounds: resume first
    second = [r / b for i, (r, b) in enumerate(pairs) if i % 2 == 1]
    if not first or not second:
        return {}
    a, b = statistics.median(first), statistics.median(second)
    return {"resume_first": first, "bare_first": second, "median_resume_first": a, "median_bare_first": b,
            "balanced": (a * b) ** 0.5}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/calm/calm_m.yaml")
    ap.add_argument("--reps", type=int, default=4,
                    help="rounds; even, so that each load order of the resume comparison comes up equally often")
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/bench_ckpt")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--label", default="this checkout")
    ap.add_argument("--override", nargs="*", default=[])
    ap.add_argument("--parts", default="resume,async",
                    help="which parts to run: resume (a, b) and/or async (c); apart, each in fresh processes, "
                         "when memory is short (async holds one more copy of the state)")
    ap.add_argument("--steps", type=int, default=2, help="training steps timed while a background save writes")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    overrides = ["train.zero_stage=1", "train.precision=fp32", "train.micro_batch_size=1", "data.seq_chunks=8",
                 "train.grad_accum_steps=1", *args.override]
    port, ctx = _port(), mp.get_context("spawn")
    raw = out / "checkpoint_bench.raw.json"
    procs = [ctx.Process(target=_rank, args=(r, args.world_size, port, args.config, overrides, args.reps, str(root),
                                             str(raw), args.steps, args.parts)) for r in range(args.world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    shutil.rmtree(root, ignore_errors=True)
    if any(p.exitcode for p in procs):
        raise SystemExit(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
    result = json.loads(raw.read_text())
    raw.unlink()
    med = {k: statistics.median(v) for k, v in result["times_s"].items() if v}
    ratio = lambda a, b: med[a] / med[b] if a in med and b in med else None  # noqa: E731
    summary = {"label": args.label, "config": args.config, "overrides": overrides, "world_size": args.world_size,
               "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **result, "median_s": med,
               "save_over_bare_save": ratio("save", "bare_save"),
               "resume_over_bare_load": ratio("resume", "bare_load"), "target": 1.15,
               "resume_over_bare_load_of_the_same_checkpoint": ratio("resume", "bare_load_ours"),
               "resume_over_bare_load_of_the_same_checkpoint_by_order": order_balanced(result["times_s"]),
               "async_blocked_over_save": ratio("async_blocked", "sync_save"),
               "steps_while_writing_over_alone": ratio("steps_while_writing", "steps_alone")}
    (out / "checkpoint_bench.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in ("label", "parameters", "median_s", "save_over_bare_save",
                                              "resume_over_bare_load", "resume_over_bare_load_of_the_same_checkpoint",
                                              "async_blocked_over_save",
                                              "steps_while_writing_over_alone")}, indent=1), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
