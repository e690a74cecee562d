"""Peak FLOP/s of one device, the denominator of MFU.

On a GPU: the vendor's dense bf16 (or TF32 for fp32 runs) figure for the model name. On a CPU there is
no datasheet number to trust, so the peak is measured: the best of a few large fp32 matmuls. MFU on a
CPU is therefore "fraction of what this CPU's matmul achieves", and is labelled as measured.
"""
from __future__ import annotations

import time

import torch

# Dense tensor-core peaks, FLOP/s: (bf16, tf32). Sources: NVIDIA datasheets (SXM parts).
_GPU_PEAKS = {"H200": (989e12, 494e12), "H100": (989e12, 494e12), "A100": (312e12, 156e12),
              "L40S": (362e12, 183e12), "A10": (125e12, 62.5e12), "V100": (125e12, 15.7e12)}


def gpu_peak_flops(name: str, bf16: bool) -> float:
    for key, (p_bf16, p_tf32) in _GPU_PEAKS.items():
        if key in name:
            return p_bf16 if bf16 else p_tf32
    return 0.0


def measured_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(device: torch.device, bf16: bool, override: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from)."""
    if override > 0:
        return override, "train.peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name, bf16)
        return peak, f"datasheet {name} {'bf16' if bf16 else 'tf32'}" if peak else f"unknown GPU {name}"
    return measured_matmul_flops(), "measured fp32 matmul peak of this CPU"
