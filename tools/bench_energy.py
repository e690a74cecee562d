#!/usr/bin/env python
"""CPU benchmark of CALM's energy head + energy loss (docs/method.md, 'Energy head').

What it measures, for two shapes -- "ref_tiny" (H=256, d=128, N=8, M=100, 4 × 508 positions) and
"calm_m" (H=1024, d=128, N=8, M=100, 4 × 2048 positions):

* time of the head (forward; forward+backward) and of the loss (forward; forward+backward), the fused
  chunked ``energy_loss`` against the plain broadcast ``energy_loss_direct``, in the same process,
  interleaved, best (minimum) of repeats -- the machine is shared, and the minimum is the run least
  disturbed by other processes; medians are stored too;
* peak memory of the loss, fused vs direct, measured in a fresh subprocess per variant (below);
* the head's matmul FLOPs (counted analytically from the module and cross-checked with
  ``torch.utils.flop_counter``) and the achieved GFLOP/s;
* the share of a CALM training step (forward, backward, clip, AdamW) spent in head + loss, for the
  tiny config (configs/tiny/calm.yaml) and for a 4-layer H=256 backbone at the ref_tiny shapes.

Loss variants. "explicit": both forms get the same pre-drawn target samples [P, M, d] (like for
like; the targets are an input and not counted). "posterior": the training path, targets drawn from
N(mu, sigma²) inside the measurement -- the fused loss draws them chunk by chunk, the direct form has
to draw all of them first.

Peak memory, two independent methods, each in a fresh Python process per variant so that nothing
the parent allocated (or the allocator kept) is counted:
  1. tensor bytes: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free
     of torch's CPU allocator; the running sum of those events, ordered in time, peaks at the
     largest amount of tensor memory alive at once during forward+backward. Exact for tensors; it
     does not see memory outside torch's allocator (oneDNN/MKL scratch, Python objects).
  2. resident memory: the process's high-water mark (VmHWM), reset just before the measured call by
     writing 5 to /proc/self/clear_refs, minus the RSS before it. glibc is told to serve every
     allocation ≥ 64 KiB with mmap (MALLOC_MMAP_THRESHOLD_), so freed tensors really leave the
     process and RSS follows live memory instead of the allocator's retained heap.
The two agree within a few percent where the peak is large; the profiler number is the headline.

Run: python tools/bench_energy.py [--out bench_out/energy.json] [--quick]
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from calm_pretrain.config import load_config  # noqa: E402
from calm_pretrain.models.calm import CALMConfig, HeadConfig  # noqa: E402
from calm_pretrain.losses import energy_loss, energy_loss_direct  # noqa: E402
from calm_pretrain.models import build_model  # noqa: E402
from calm_pretrain.models.calm.heads import EnergyHead  # noqa: E402

THREADS = 2


@dataclass
class Shape:
    name: str
    hidden: int
    latent: int = 128
    n: int = 8  # head samples per position
    m: int = 100  # target samples per position
    batch: int = 4
    positions: int = 508  # target positions per sequence
    noise: int = 64
    blocks: int = 4
    head_positions: int = 0  # time the head on this many positions and scale (0 = all)

    @property
    def p(self) -> int:
        return self.batch * self.positions


SHAPES = {
    "ref_tiny": Shape("ref_tiny", hidden=256),
    # The CALM-M head costs ~1.1 GFLOP per position (fwd+bwd): 8192 positions would take minutes on
    # 2 cores. The head has no interaction across positions, so its time is linear in the number of
    # positions: it is timed on 128 of them (GEMMs of 1024 rows, already large enough to run at full
    # speed) and scaled by 64 (reported as such).
    "calm_m": Shape("calm_m", hidden=1024, positions=2048, head_positions=128),
}


# --------------------------------------------------------------------------------------------
# Inputs and the measured callables
# --------------------------------------------------------------------------------------------
def make_inputs(shape: Shape, batch: int, seed: int = 0):
    """Latent-like data: posterior means of size ~sqrt(d), sigma ~0.3, model samples near them."""
    g = torch.Generator().manual_seed(seed)
    lead = (batch, shape.positions)
    mu = torch.randn(*lead, shape.latent, generator=g)
    log_sigma = torch.full((*lead, shape.latent), math.log(0.3))
    x = mu[..., None, :] + 0.5 * torch.randn(*lead, shape.n, shape.latent, generator=g)
    y = mu[..., None, :] + 0.3 * torch.randn(*lead, shape.m, shape.latent, generator=g)
    return x, y, mu, log_sigma


def loss_call(variant: str, x: torch.Tensor, y, mu, log_sigma, m: int, backward: bool):
    """One loss evaluation (mean over positions) and optionally its backward to the samples x."""
    if variant == "fused_explicit":
        loss = energy_loss(x, targets=y)
    elif variant == "direct_explicit":
        loss = energy_loss_direct(x, y)
    elif variant == "fused_posterior":
        loss = energy_loss(x, mu, log_sigma, num_target_samples=m)
    elif variant == "direct_posterior":
        eps = torch.randn(*mu.shape[:-1], m, mu.shape[-1])
        loss = energy_loss_direct(x, mu[..., None, :] + log_sigma.exp()[..., None, :] * eps)
    else:
        raise ValueError(variant)
    loss = loss.mean()
    if backward:
        loss.backward()
    return loss


LOSS_VARIANTS = ("fused_explicit", "direct_explicit", "fused_posterior", "direct_posterior")


def build_head(shape: Shape) -> EnergyHead:
    torch.manual_seed(0)
    head = EnergyHead(shape.hidden, shape.latent, HeadConfig(num_blocks=shape.blocks, noise_size=shape.noise,
                                                             num_samples=shape.n, num_target_samples=shape.m))
    # the published zero-init output would make every sample 0 and the model-model distances degenerate
    torch.nn.init.normal_(head.final_layer.linears[2].weight, std=0.02)
    return head


def timed(fn, reps: int, warmup: int = 1) -> list[tuple[float, float]]:
    """(wall seconds, process CPU seconds) per repeat. CPU time (all threads summed) is the cost of
    the work itself; wall time also contains whatever other processes on a shared machine take."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        gc.collect()
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        out.append((time.perf_counter() - w0, time.process_time() - c0))
    return out


def best(runs: list[tuple[float, float]], scale: float = 1.0) -> dict:
    """Minimum over repeats (the least disturbed run) of wall and CPU time, and the wall median."""
    return {"wall_s": scale * min(w for w, _ in runs), "cpu_s": scale * min(c for _, c in runs),
            "wall_median_s": scale * statistics.median(w for w, _ in runs)}


# --------------------------------------------------------------------------------------------
# FLOPs of the head
# --------------------------------------------------------------------------------------------
def head_flops(shape: Shape, positions: int) -> dict:
    """Matmul FLOPs (2 per multiply-add) of EnergyHead, read off the module:

    per position (shared by its N samples): hidden_embd H→H, and in every block the condition half of
        the first linear (H of its 2H inputs) → (1 + blocks)·2H²
    per sample: noise_embd noise→H: 2·noise·H; per block: the LN(x) half of Linear(2H→H) 2H²,
        Linear(H→H) 2H², Linear(H→2H) 4H², down Linear(H→H) 2H² = 10H²; final Linear(H→H) 2H² and
        Linear(H→d) 2Hd.
    Backward: every linear needs its weight gradient (same FLOPs as forward) and its input gradient
    (same again) except noise_embd, whose input is noise. h gets a gradient (it comes from the
    backbone in CALM). LayerNorm/SiLU/bias elementwise work is not counted (< 1%)."""
    h, n = shape.hidden, shape.n
    per_position = (1 + shape.blocks) * 2 * h * h
    per_sample = 2 * shape.noise * h + shape.blocks * 10 * h * h + 2 * h * h + 2 * h * shape.latent
    fwd = positions * (per_position + n * per_sample)
    bwd = 2 * fwd - positions * n * 2 * shape.noise * h
    return {"forward": fwd, "backward": bwd, "forward_backward": fwd + bwd,
            "per_position_forward": per_position + n * per_sample}


def counted_head_flops(shape: Shape, positions: int = 4) -> dict:
    """The same count by torch.utils.flop_counter on a real forward+backward (a cross-check)."""
    from torch.utils.flop_counter import FlopCounterMode

    head = build_head(shape)
    h = torch.randn(positions, shape.hidden, requires_grad=True)
    with FlopCounterMode(display=False) as fwd_counter:
        out = head.sample(h, shape.n)
    with FlopCounterMode(display=False) as bwd_counter:
        out.backward(torch.ones_like(out))
    return {"forward": fwd_counter.get_total_flops(), "backward": bwd_counter.get_total_flops()}


# --------------------------------------------------------------------------------------------
# Peak memory, in a subprocess per variant
# --------------------------------------------------------------------------------------------
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _profiled_peak_bytes(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:  # +bytes on allocation, -bytes on free
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def memory_worker(spec: dict) -> dict:
    """Runs in a fresh process: peak memory of one loss variant's forward+backward."""
    torch.set_num_threads(THREADS)
    shape = Shape(**spec["shape"])
    variant, batch = spec["variant"], spec["batch"]

    # warm-up on a small problem first: loads kernels and libraries, which must not count as the loss's
    small = Shape(**{**spec["shape"], "positions": 16})
    x, y, mu, ls = make_inputs(small, 1)
    x.requires_grad_(True)
    # ... under the profiler, whose first use allocates ~70 MB of its own that would otherwise be
    # counted in the RSS peak below
    _profiled_peak_bytes(lambda: loss_call(variant, x, y, mu, ls, shape.m, backward=True))

    x, y, mu, ls = make_inputs(shape, batch)
    x.requires_grad_(True)
    gc.collect()
    # one measured run gives both numbers (the profiler's own event buffers are a few hundred KiB)
    base_kib = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    tensor_peak = _profiled_peak_bytes(lambda: loss_call(variant, x, y, mu, ls, shape.m, backward=True))
    rss_peak = (_rss_kib("VmHWM") - base_kib) * 1024
    return {"tensor_peak_bytes": tensor_peak, "rss_peak_bytes": rss_peak}


def measure_memory(shape: Shape, variant: str, batch: int) -> dict:
    spec = {"shape": shape.__dict__, "variant": variant, "batch": batch}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(THREADS)}
    proc = subprocess.run([sys.executable, __file__, "--memory-worker", json.dumps(spec)], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# The benchmark of one shape
# --------------------------------------------------------------------------------------------
def loss_batch_for_direct(shape: Shape) -> int:
    """Full batch unless the direct form (≈ 3 live copies of [P, N, M, d] fp32 at its peak, plus
    the posterior draw) would not fit comfortably in the memory that is free now."""
    import psutil

    per_row = 3 * shape.positions * shape.n * shape.m * shape.latent * 4
    available = psutil.virtual_memory().available
    batch = shape.batch
    while batch > 1 and batch * per_row > 0.5 * available:
        batch //= 2
    return batch


def bench_shape(shape: Shape, reps: int, loss_reps: int, warmup: bool = True) -> dict:
    res: dict = {"shape": dict(shape.__dict__), "positions_total": shape.p}

    # ---- head: forward, and forward+backward with a random upstream gradient ----
    head = build_head(shape)
    hp = shape.head_positions or shape.p
    scale = shape.p / hp
    h = torch.randn(hp, shape.hidden, requires_grad=True)
    upstream = torch.randn(hp, shape.n, shape.latent)

    def head_fwd():
        return head.sample(h, shape.n)

    def head_fwd_bwd():
        head.sample(h, shape.n).backward(upstream)

    fwd = best(timed(head_fwd, reps), scale)
    fwd_bwd = best(timed(head_fwd_bwd, reps), scale)
    flops = head_flops(shape, shape.p)
    res["head"] = {
        "timed_positions": hp, "scale_to_full": scale, "forward": fwd, "forward_backward": fwd_bwd,
        "gflop_forward": flops["forward"] / 1e9,
        "gflop_forward_backward": flops["forward_backward"] / 1e9,
        "gflops_per_s_forward": flops["forward"] / fwd["wall_s"] / 1e9,
        "gflops_per_s_forward_backward": flops["forward_backward"] / fwd_bwd["wall_s"] / 1e9,
        "mflop_per_position_forward": flops["per_position_forward"] / 1e6,
    }
    counted = counted_head_flops(shape)
    analytic = head_flops(shape, 4)
    res["head"]["flop_count_check"] = {"analytic": {k: analytic[k] for k in ("forward", "backward")},
                                       "flop_counter": counted}
    del head, h, upstream

    # ---- loss: fused vs direct, same inputs, interleaved repeats ----
    batch = loss_batch_for_direct(shape)
    res["loss_batch"] = batch
    res["loss_positions"] = batch * shape.positions
    x, y, mu, ls = make_inputs(shape, batch)
    x.requires_grad_(True)
    runs = {v: {"forward": [], "forward_backward": []} for v in LOSS_VARIANTS}
    if warmup:  # loads kernels; not needed once a smaller shape has run the same code in this process
        for v in LOSS_VARIANTS:
            loss_call(v, x, y, mu, ls, shape.m, backward=True)
    for _ in range(loss_reps):
        for v in LOSS_VARIANTS:
            for kind, bwd in (("forward", False), ("forward_backward", True)):
                x.grad = None

                def call(v=v, bwd=bwd):
                    with torch.set_grad_enabled(bwd):  # forward alone = an eval pass (no graph)
                        loss_call(v, x, y, mu, ls, shape.m, backward=bwd)

                runs[v][kind] += timed(call, 1, warmup=0)
    del x, y, mu, ls
    gc.collect()
    res["loss"] = {v: {k: best(r) for k, r in d.items()} for v, d in runs.items()}

    # ---- loss peak memory, a fresh process per variant ----
    for v in LOSS_VARIANTS:
        res["loss"][v].update(measure_memory(shape, v, batch))

    L = res["loss"]
    res["ratios"] = {}
    for targets in ("explicit", "posterior"):
        fused, direct = L[f"fused_{targets}"], L[f"direct_{targets}"]
        res["ratios"][targets] = {
            "wall_time": fused["forward_backward"]["wall_s"] / direct["forward_backward"]["wall_s"],
            "cpu_time": fused["forward_backward"]["cpu_s"] / direct["forward_backward"]["cpu_s"],
            "tensor_peak": fused["tensor_peak_bytes"] / direct["tensor_peak_bytes"],
            "rss_peak": fused["rss_peak_bytes"] / direct["rss_peak_bytes"],
        }
    # head + loss forward+backward per training step of this shape (loss scaled to the full batch)
    loss_scale = shape.batch / batch
    res["head_plus_loss_forward_backward_wall_s"] = {
        v: res["head"]["forward_backward"]["wall_s"] + L[v]["forward_backward"]["wall_s"] * loss_scale
        for v in ("fused_posterior", "direct_posterior")}
    return res


# --------------------------------------------------------------------------------------------
# Share of a training step spent in head + loss
# --------------------------------------------------------------------------------------------
def step_fraction(cfg: CALMConfig, batch: int, chunks: int, reps: int) -> dict:
    """Time a whole training step (forward, backward, grad clip, AdamW) of a CALM, and head+loss
    forward+backward alone at the same shapes (h a leaf standing in for the backbone output)."""
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.randint(3, cfg.vocab_size, (batch, chunks * cfg.k))
    mu = torch.randn(batch, chunks, cfg.latent_dim)
    ls = torch.full((batch, chunks, cfg.latent_dim), math.log(0.3))

    def step():
        opt.zero_grad(set_to_none=True)
        model(ids, mu, ls).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step()  # warm-up; also moves the zero-initialised head output off zero
    h = torch.randn(batch, chunks - 1, cfg.hidden_size, requires_grad=True)

    def head_loss():
        model.head.loss(h, mu[:, 1:], ls[:, 1:]).mean().backward()

    r_step, r_head = [], []
    for _ in range(reps):  # interleaved, so drifting machine load hits both alike
        r_step += timed(step, 1, warmup=0)
        r_head += timed(head_loss, 1, warmup=0)
    s, hl = best(r_step), best(r_head)
    return {"batch": batch, "chunk_positions": chunks, "target_positions": chunks - 1,
            "hidden": cfg.hidden_size, "layers": cfg.num_layers, "vocab": cfg.vocab_size,
            "head_blocks": cfg.head.num_blocks, "N": cfg.head.num_samples, "M": cfg.head.num_target_samples,
            "latent": cfg.latent_dim, "step": s, "head_loss": hl,
            "fraction_wall": hl["wall_s"] / s["wall_s"], "fraction_cpu": hl["cpu_s"] / s["cpu_s"]}


# --------------------------------------------------------------------------------------------
def fmt_bytes(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def print_table(out: dict) -> None:
    for name, r in out["shapes"].items():
        s = r["shape"]
        print(f"\n== {name}: H={s['hidden']} d={s['latent']} N={s['n']} M={s['m']} "
              f"batch={s['batch']} x {s['positions']} positions ({r['positions_total']}) ==")
        hd = r["head"]
        if hd["scale_to_full"] != 1:
            print(f"head timed on {hd['timed_positions']} positions, scaled x{hd['scale_to_full']:g}")
        print(f"head: fwd {hd['forward']['wall_s']:.3f} s (cpu {hd['forward']['cpu_s']:.3f}), "
              f"fwd+bwd {hd['forward_backward']['wall_s']:.3f} s (cpu {hd['forward_backward']['cpu_s']:.3f}); "
              f"{hd['gflop_forward_backward']:.0f} GFLOP fwd+bwd, {hd['mflop_per_position_forward']:.1f} "
              f"MFLOP/position fwd; {hd['gflops_per_s_forward']:.0f} GFLOP/s fwd, "
              f"{hd['gflops_per_s_forward_backward']:.0f} GFLOP/s fwd+bwd")
        if r["loss_batch"] != s["batch"]:
            print(f"loss measured at batch {r['loss_batch']} ({r['loss_positions']} positions): "
                  f"the direct form at batch {s['batch']} would not fit comfortably in free memory")
        print(f"{'loss variant':<18}{'fwd s':>8}{'(cpu)':>8}{'fwd+bwd s':>11}{'(cpu)':>8}"
              f"{'tensor peak':>13}{'RSS peak':>12}")
        for v, d in r["loss"].items():
            f, fb = d["forward"], d["forward_backward"]
            print(f"{v:<18}{f['wall_s']:>8.3f}{f['cpu_s']:>8.3f}{fb['wall_s']:>11.3f}{fb['cpu_s']:>8.3f}"
                  f"{fmt_bytes(d['tensor_peak_bytes']):>13}{fmt_bytes(d['rss_peak_bytes']):>12}")
        for targets, q in r["ratios"].items():
            print(f"fused/direct ({targets} targets), fwd+bwd: wall time {q['wall_time']:.3f}, "
                  f"cpu time {q['cpu_time']:.3f}, tensor peak {q['tensor_peak']:.4f}, RSS peak {q['rss_peak']:.4f}")
        hl = r["head_plus_loss_forward_backward_wall_s"]
        print(f"head+loss fwd+bwd per step (posterior targets): fused {hl['fused_posterior']:.3f} s, "
              f"direct {hl['direct_posterior']:.3f} s")
    print("\n== share of a CALM training step (fwd, bwd, clip, AdamW) in head + loss fwd+bwd ==")
    for name, f in out["step_fraction"].items():
        print(f"{name}: {f['layers']} layers H={f['hidden']} vocab={f['vocab']}, batch {f['batch']} x "
              f"{f['target_positions']} positions, head {f['head_blocks']} blocks N={f['N']} M={f['M']} "
              f"d={f['latent']}: step {f['step']['wall_s']:.3f} s (cpu {f['step']['cpu_s']:.3f}), head+loss "
              f"{f['head_loss']['wall_s']:.3f} s (cpu {f['head_loss']['cpu_s']:.3f}) -> "
              f"{100 * f['fraction_wall']:.0f}% of wall, {100 * f['fraction_cpu']:.0f}% of cpu")
    t = out["targets"]
    print(f"\ntargets (fused <= 0.5x time, <= 1/20 peak memory of direct): "
          f"time {'MET' if t['time_met'] else 'MISSED'}, memory {'MET' if t['memory_met'] else 'MISSED'}")


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_out/energy.json")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small shapes, 1 repeat (a smoke test)")
    ap.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return

    t_start = time.perf_counter()
    shapes = dict(SHAPES)
    reps = args.reps
    if args.quick:
        shapes = {"ref_tiny": Shape("ref_tiny", hidden=64, positions=64, batch=2),
                  "calm_m": Shape("calm_m", hidden=128, positions=128, batch=2, head_positions=64)}
        reps = 1
    out: dict = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "loadavg_start": os.getloadavg(), "shapes": {}, "step_fraction": {},
    }
    for name, shape in shapes.items():
        print(f"[bench] {name} ...", flush=True)
        # CALM-M loss: one repeat, the direct form there runs for tens of seconds per call
        big = name == "calm_m"
        out["shapes"][name] = bench_shape(shape, max(1, reps - 1) if big else reps, loss_reps=1 if big else reps,
                                          warmup=not big)

    print("[bench] training-step shares ...", flush=True)
    tiny = load_config(REPO / "configs/tiny/calm.yaml")
    chunks = 16 if args.quick else tiny.data.seq_chunks
    # a tiny step takes a fraction of a second: more repeats make the minimum robust to machine load
    out["step_fraction"]["tiny_config"] = step_fraction(tiny.model, tiny.train.micro_batch_size, chunks, 3 * reps)
    ref = CALMConfig(vocab_size=128257, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4,
                     num_kv_heads=4, max_position_embeddings=512, k=4, latent_dim=128,
                     head=HeadConfig(num_blocks=4, noise_size=64, num_samples=8, num_target_samples=100))
    ref.validate("model")
    out["step_fraction"]["ref_tiny_dims"] = step_fraction(ref, 2 if args.quick else 4, 16 if args.quick else 509,
                                                          max(1, reps - 1))

    ratios = [q for r in out["shapes"].values() for q in r["ratios"].values()]
    out["targets"] = {  # both target modes, both shapes
        "time_met": all(q["wall_time"] <= 0.5 and q["cpu_time"] <= 0.5 for q in ratios),
        "memory_met": all(q["tensor_peak"] <= 1 / 20 and q["rss_peak"] <= 1 / 20 for q in ratios),
    }
    out["loadavg_end"] = os.getloadavg()
    out["wall_s"] = time.perf_counter() - t_start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print_table(out)
    print(f"\nwall {out['wall_s']:.0f} s, load average {out['loadavg_start'][0]:.1f} → {out['loadavg_end'][0]:.1f}; "
          f"written {args.out}")


if __name__ == "__main__":
    main()
