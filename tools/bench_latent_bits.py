#!/usr/bin/env python
"""How few bits does a stored latent need? Writes a JSON of numbers and prints a table (CPU).

For each trained autoencoder and a fixed set of held-out token blocks: encode to the posterior (mu,
log_sigma) in float32, then store mu and log_sigma SEPARATELY in one of these forms and read them back:

* ``bf16``: bfloat16, round to nearest even (the shards' default);
* ``sym<b>/<g>``: symmetric b-bit integers in [-(2^(b-1)-1), 2^(b-1)-1], one float16 scale (absmax /
  qmax) per group of g values (``/v``: one group per d-dimensional vector; ``sym8/v`` is the shards'
  int8);
* ``asym<b>/<g>``: unsigned b-bit integers in [0, 2^b-1] with a float16 offset (the group minimum) and
  a float16 step ((max - min) / (2^b-1)) per group; for log_sigma, whose values sit in a narrow band
  away from 0 (symmetric scales waste most levels on it).

Measured against the float32 posterior, on the same blocks and the same noise draw (fixed seed):

* ``acc_mu``: reconstruction token accuracy of the decoder's argmax at the dequantized mu;
* ``acc_noise``: accuracy at the training-time sample z = mu + exp(log_sigma)·eps with the dequantized
  values; ``changed_noise``: tokens whose argmax differs from the float32 sample's (a paired count);
* ``sigma_rel_err``: |exp(log_sigma') - exp(log_sigma)| / exp(log_sigma) (mean, rms, max), the
  energy-score targets' spread error; ``mu_err_sigmas``: rms of (mu' - mu) / sigma (the mean's error in
  units of the posterior's own spread);
* bytes per token, counted exactly: ids (uint16, or int32 past 65,536 ids), payload bits, scales and
  offsets, the row CRC (4 bytes per sample of L chunks), per chunk / K; also the same for K=4, d=128
  (CALM-M's latent shape; computed, no AE of that shape is trained here), and an estimate after zstd
  (level 3, the shards' codec, over record-batch-sized slices of each bit-packed column).

mu-only formats keep log_sigma float32 (and the other way round); ``combined`` rows store both.

    python tools/bench_latent_bits.py --runs runs --blocks 64 --out docs/latent_bits.json   # the AEs of runs/ (~30 min)
    python tools/bench_latent_bits.py --ae main=runs/demo_full/release/ae --blocks 8 --out /tmp/q.json

torch runs with one thread; on a shared 2-core machine the time moves with the load (recorded).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from data_pipeline.shards import TARGET_BATCH_BYTES, ZSTD_LEVEL, bf16_bits_to_f32, f32_to_bf16_bits  # noqa: E402

DEFAULT_AES = ["main=demo_full/release/ae", "k1-d16=study/release/k1-d16", "k2-d32=study/release/k2-d32",
               "k4-d16=study/release/k4-d16", "k4-d64-kl1e-2=study/release/k4-d64-kl1e-2"]
# (mu format, log_sigma format): mu formats pair with float32 log_sigma, and the other way round.
MU_FORMATS = ["bf16"] + [f"sym{b}/{g}" for b in (8, 6, 5, 4, 3) for g in ("v", "16")] + ["sym4/8", "sym3/8"]
LS_FORMATS = ["bf16", "sym8/v", "sym4/v"] + [f"asym{b}/{g}" for b in (8, 6, 4, 3, 2) for g in ("v", "16")]
COMBINED = [("sym8/v", "sym8/v"), ("sym8/v", "asym4/v"), ("sym8/v", "asym3/v"), ("sym6/v", "asym4/v"),
            ("sym6/16", "asym4/v"), ("sym5/16", "asym4/v"), ("sym4/16", "asym4/v"), ("bf16", "bf16"),
            # <= 30 bytes/token at K=4, d=128 (about 3.5 bits per value):
            ("sym4/v", "asym3/v"), ("sym4/v", "asym2/v"), ("sym3/16", "asym3/v")]
QUICK_MU = ["bf16", "sym8/v", "sym6/v", "sym6/16", "sym5/16", "sym4/16"]
QUICK_LS = ["bf16", "sym8/v", "asym4/v", "asym3/v", "asym2/v"]
QUICK_COMBINED = [("sym8/v", "sym8/v"), ("sym8/v", "asym4/v"), ("sym6/v", "asym4/v"), ("sym5/16", "asym4/v")]


def log(msg: str) -> None:
    print(f"[bench_latent_bits {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Formats: quantize + dequantize (float32 in, float32 out) and their exact storage cost
# --------------------------------------------------------------------------------------------
def parse_format(fmt: str, d: int) -> tuple[str, int, int]:
    """'sym6/16' → ('sym', 6, 16); '/v' → one group of d; 'bf16' → ('bf16', 16, d); 'f32' → ('f32', 32, d)."""
    if fmt in ("bf16", "f32"):
        return fmt, 16 if fmt == "bf16" else 32, d
    kind_bits, group = fmt.split("/")
    kind = "asym" if kind_bits.startswith("asym") else "sym"
    bits, g = int(kind_bits[len(kind):]), d if group == "v" else int(group)
    if d % g or not (2 <= bits <= 8) or (kind == "sym" and bits < 3):
        raise ValueError(f"format {fmt!r} does not fit d={d}")
    return kind, bits, g


def quantize(x: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [..., d] float32 → (codes uint8 [..., d] (unsigned: sym codes offset by qmax), per-group float16
    metadata [..., groups, 1 or 2], dequantized float32 [..., d])."""
    d = x.shape[-1]
    kind, bits, g = parse_format(fmt, d)
    if kind == "f32":
        return np.zeros(x.shape, np.uint8), np.zeros(x.shape[:-1] + (0, 1), np.float16), x.astype(np.float32)
    if kind == "bf16":
        b = f32_to_bf16_bits(x)
        return b.view(np.uint8), np.zeros(x.shape[:-1] + (0, 1), np.float16), bf16_bits_to_f32(b)
    xs = x.reshape(*x.shape[:-1], d // g, g).astype(np.float32)
    if kind == "sym":
        qmax = 2 ** (bits - 1) - 1
        scale = (np.abs(xs).max(-1, keepdims=True) / qmax).astype(np.float16)
        s = scale.astype(np.float32)
        q = np.clip(np.rint(xs / np.where(s > 0, s, 1.0)), -qmax, qmax)
        deq, codes, meta = q * s, q + qmax, scale
    else:
        levels = 2 ** bits - 1
        lo = xs.min(-1, keepdims=True).astype(np.float16)
        step = ((xs.max(-1, keepdims=True) - lo.astype(np.float32)) / levels).astype(np.float16)
        lo32, st = lo.astype(np.float32), step.astype(np.float32)
        q = np.clip(np.rint((xs - lo32) / np.where(st > 0, st, 1.0)), 0, levels)
        deq, codes, meta = lo32 + q * st, q, np.concatenate([lo, step], -1)
    if not np.isfinite(meta).all():
        raise ValueError(f"{fmt}: values too large for a float16 scale")
    return codes.astype(np.uint8).reshape(x.shape), meta, deq.reshape(x.shape).astype(np.float32)


def vector_bytes(fmt: str, d: int) -> float:
    """Stored bytes of one d-vector: payload bits + float16 metadata."""
    kind, bits, g = parse_format(fmt, d)
    if kind in ("bf16", "f32"):
        return d * bits / 8
    return d * bits / 8 + (d // g) * (2 if kind == "sym" else 4)


def bytes_per_token(mu_fmt: str, ls_fmt: str, k: int, d: int, seq_chunks: int, id_bytes: int = 2) -> float:
    per_chunk = k * id_bytes + vector_bytes(mu_fmt, d) + vector_bytes(ls_fmt, d) + 4 / seq_chunks
    return per_chunk / k


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Rows of unsigned b-bit codes → rows of bytes, bit-packed (little-endian bit order)."""
    b = np.unpackbits(codes[..., None], axis=-1, bitorder="little")[..., :bits]
    return np.packbits(b.reshape(len(codes), -1), axis=-1, bitorder="little")


def zstd_bytes_per_token(ids, stored: dict, tokens: int, row_bytes: float) -> float:
    """zstd (level 3) size of the stored columns (with the ids and the CRC column unless `ids` is None),
    compressed in record-batch-sized slices of rows, per token."""
    codec = pa.Codec("zstd", compression_level=ZSTD_LEVEL)
    rows = max(1, int(TARGET_BATCH_BYTES // row_bytes))
    cols = list(stored.values()) if ids is None else [ids] + list(stored.values())
    total = 0 if ids is None else 4 * len(ids)  # the CRC column: incompressible
    for col in cols:
        for start in range(0, len(col), rows):
            total += codec.compress(np.ascontiguousarray(col[start:start + rows]).tobytes(), asbytes=True).__len__()
    return total / tokens


def stored_columns(name: str, codes: np.ndarray, meta: np.ndarray, fmt: str, n: int) -> dict:
    kind, bits, _ = parse_format(fmt, codes.shape[-1])
    if kind in ("bf16", "f32"):
        return {name: codes.reshape(n, -1)}
    return {name: pack_bits(codes.reshape(n, -1), bits), f"{name}_meta": meta.reshape(n, -1)}


# --------------------------------------------------------------------------------------------
# Measuring one autoencoder
# --------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, ae, blocks: list[torch.Tensor], seed: int, batch: int):
        self.ae, self.batch = ae, batch
        self.ids = torch.cat(blocks)  # [n, T]
        with torch.no_grad():
            parts = [ae.encode(self.ids[i:i + batch]) for i in range(0, len(self.ids), batch)]
        self.mu = torch.cat([p[0] for p in parts]).float().numpy()
        self.ls = torch.cat([p[1] for p in parts]).float().numpy()
        self.eps = torch.randn(self.mu.shape, generator=torch.Generator().manual_seed(seed)).numpy()
        self.sigma = np.exp(self.ls)
        self.ref_noise = self.decode(self.mu + self.sigma * self.eps)

    def decode(self, z: np.ndarray) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for i in range(0, len(z), self.batch):
                out.append(self.ae.decode(torch.from_numpy(np.ascontiguousarray(z[i:i + self.batch]))).argmax(-1))
        return torch.cat(out)

    def accuracy(self, tokens: torch.Tensor) -> float:
        return (tokens == self.ids).double().mean().item()

    def measure(self, mu_fmt: str, ls_fmt: str, seq_chunks: int, id_bytes: int) -> dict:
        n, _, d = self.mu.shape
        k = self.ae.k
        mc, mm, mu = quantize(self.mu, mu_fmt)
        lc, lm, ls = quantize(self.ls, ls_fmt)
        sigma = np.exp(ls)
        rel = np.abs(sigma - self.sigma) / self.sigma
        row: dict = {"mu": mu_fmt, "log_sigma": ls_fmt}
        if mu_fmt != "f32":
            row["acc_mu"] = self.accuracy(self.decode(mu))
        noise = self.decode(mu + sigma * self.eps)
        row["acc_noise"] = self.accuracy(noise)
        row["changed_noise"] = int((noise != self.ref_noise).sum())
        row["sigma_rel_err"] = {"mean": float(rel.mean()), "rms": float(np.sqrt((rel ** 2).mean())),
                                "max": float(rel.max())}
        row["mu_err_sigmas_rms"] = float(np.sqrt((((mu - self.mu) / self.sigma) ** 2).mean()))
        ids = self.ids.numpy().astype(np.uint16 if id_bytes == 2 else np.int32)
        if "f32" in (mu_fmt, ls_fmt):  # one tensor quantized: its own bytes per token (no ids, no CRC)
            fmt, name, codes, meta = (mu_fmt, "mu", mc, mm) if ls_fmt == "f32" else (ls_fmt, "log_sigma", lc, lm)
            if fmt != "f32":
                row["tensor_bytes_per_token"] = vector_bytes(fmt, d) / k
                row["tensor_bytes_per_token_k4_d128"] = vector_bytes(fmt, 128) / 4
                row["tensor_bytes_per_token_zstd"] = zstd_bytes_per_token(
                    None, stored_columns(name, codes, meta, fmt, n), ids.size, vector_bytes(fmt, d) * ids.shape[1] / k)
            return row
        row["bytes_per_token"] = bytes_per_token(mu_fmt, ls_fmt, k, d, seq_chunks, id_bytes)
        row["bytes_per_token_k4_d128"] = bytes_per_token(mu_fmt, ls_fmt, 4, 128, 2048 // 4, id_bytes)
        stored = {**stored_columns("mu", mc, mm, mu_fmt, n), **stored_columns("log_sigma", lc, lm, ls_fmt, n)}
        row["bytes_per_token_zstd"] = zstd_bytes_per_token(ids, stored, ids.size, row["bytes_per_token"] * ids.shape[1])
        return row


def run_ae(name: str, path: Path, heldout: Path, args) -> dict:
    from calm_pretrain.eval.source import heldout_blocks
    from calm_pretrain.release.autoencoder import load_autoencoder

    t0 = time.time()
    ae = load_autoencoder(path)
    cfg = ae.config
    blocks = heldout_blocks(heldout, args.blocks)
    t = blocks[0].shape[-1]
    seq_chunks = t // cfg.k
    id_bytes = 2 if cfg.vocab_size <= 1 << 16 else 4
    log(f"{name}: K={cfg.k} d={cfg.latent_dim}, {len(blocks)} blocks of {t} tokens; encoding")
    b = Bench(ae, blocks, args.seed, args.batch)
    ref = b.measure("f32", "f32", seq_chunks, id_bytes)
    ref["acc_mu"] = b.accuracy(b.decode(b.mu))
    log(f"{name}: float32 accuracy {ref['acc_mu']:.6f} at mu, {ref['acc_noise']:.6f} at the noise sample")
    quick = name != args.full
    plan = ([(m, "f32") for m in (QUICK_MU if quick else MU_FORMATS)]
            + [("f32", s) for s in (QUICK_LS if quick else LS_FORMATS)]
            + list(QUICK_COMBINED if quick else COMBINED))
    if args.combined:
        plan = [(m, s) for m, s in args.combined]
    rows = []
    for i, (m, s) in enumerate(plan):
        rows.append(b.measure(m, s, seq_chunks, id_bytes))
        r = rows[-1]
        for key in ("acc_mu", "acc_noise"):
            if key in r:
                r[f"{key}_loss_pp"] = 100 * (ref[key] - r[key])
        bpt = r.get("bytes_per_token", r.get("tensor_bytes_per_token"))
        log(f"{name}: [{i + 1}/{len(plan)}] mu {m}, log_sigma {s}: {bpt:.2f} B/token, "
            f"noise acc loss {r['acc_noise_loss_pp']:+.3f} pp")
    return {"name": name, "path": str(path), "k": cfg.k, "latent_dim": cfg.latent_dim, "kl_weight": cfg.kl_weight,
            "blocks": len(blocks), "tokens": int(b.ids.numel()), "seq_chunks": seq_chunks,
            "log_sigma_stats": {"mean": float(b.ls.mean()), "min": float(b.ls.min()), "max": float(b.ls.max()),
                                "vector_range_median": float(np.median(b.ls.max(-1) - b.ls.min(-1)))},
            "mu_absmax_median": float(np.median(np.abs(b.mu).max(-1))),
            "float32": ref, "rows": rows, "seconds": time.time() - t0}


def fmt_name(m: str, s: str) -> str:
    return f"mu {m}" if s == "f32" else f"log_sigma {s}" if m == "f32" else f"mu {m} + log_sigma {s}"


def table(results: list[dict]) -> str:
    lines = ["Single-tensor rows: that tensor's bytes per token only (the other stays float32); combined rows: "
             "the whole sample (ids, both tensors, scales, CRC).", "",
             "| AE | format | B/token | B/token zstd | B/token K=4 d=128 | acc mu loss (pp) | acc noise loss (pp) "
             "| changed (noise) | sigma rel err mean / max | (mu'-mu)/sigma rms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            mu_loss = f"{r['acc_mu_loss_pp']:+.3f}" if "acc_mu_loss_pp" in r else "-"
            sig = r["sigma_rel_err"]
            pre = "" if "bytes_per_token" in r else "tensor_"
            b = [r.get(f"{pre}bytes_per_token{x}") for x in ("", "_zstd", "_k4_d128")]
            b = ["-" if v is None else f"{v:.{p}f}" for v, p in zip(b, (2, 1, 1))]
            lines.append(f"| {res['name']} | {fmt_name(r['mu'], r['log_sigma'])} | {' | '.join(b)} | {mu_loss} | "
                         f"{r['acc_noise_loss_pp']:+.3f} | {r['changed_noise']} | "
                         f"{100 * sig['mean']:.2f}% / {100 * sig['max']:.1f}% | {r['mu_err_sigmas_rms']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ae", action="append", default=None, metavar="NAME=DIR",
                   help="autoencoder release/checkpoint directories (default: the main job's and the study's, "
                        "under --runs)")
    p.add_argument("--runs", default=str(REPO / "runs"), help="where the default --ae and --heldout are")
    p.add_argument("--heldout", default=None, help="held-out token shards (default: RUNS/demo_full/data/heldout)")
    p.add_argument("--blocks", type=int, default=128, help="held-out blocks per AE (0: all)")
    p.add_argument("--full", default="main", help="the AE that gets every format; the others get a short list")
    p.add_argument("--combined", nargs="+", type=lambda v: tuple(v.split("+")), metavar="MU+LOG_SIGMA",
                   help="only these combined formats, e.g. sym4/v+asym2/v")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = Path(args.runs)
    heldout = Path(args.heldout) if args.heldout else runs / "demo_full" / "data" / "heldout"
    results = []
    for spec in args.ae or DEFAULT_AES:
        name, _, d = spec.partition("=")
        path = Path(d) if Path(d).is_absolute() or Path(d).exists() else runs / d
        results.append(run_ae(name, path, heldout, args))
        Path(args.out).write_text(json.dumps(_doc(args, heldout, results), indent=1) + "\n")
    print(table(results))
    log(f"wrote {args.out}")
    return 0


def _doc(args, heldout: Path, results: list[dict]) -> dict:
    return {"tool": "tools/bench_latent_bits.py", "date": time.strftime("%Y-%m-%d"), "heldout": str(heldout),
            "seed": args.seed, "threads": args.threads, "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "load_average": os.getloadavg(), "torch": torch.__version__, "aes": results}


if __name__ == "__main__":
    raise SystemExit(main())
