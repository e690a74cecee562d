"""How a latent shard stores one posterior tensor (mu or log_sigma, [n, L, d] float32): the latent dtypes.

=============  =====================================================================  ==============
dtype          mu                                                                     log_sigma
=============  =====================================================================  ==============
``bf16``       bfloat16 bits (uint16), round to nearest even                          as mu
``int8``       int8, symmetric per-vector scale ``mu_scale`` (float16, absmax / 127)  as mu
``int8-ls4``   as int8                                                                4 bits
=============  =====================================================================  ==============

``int8-ls4`` stores log_sigma as unsigned 4-bit codes q in [0, 15], two per byte (the row's L·d codes in
order, the first of each pair in the low nibble, a trailing high nibble 0 when L·d is odd), with a float16
offset (the vector's minimum, ``log_sigma_offset``) and step ((max - min) / 15, ``log_sigma_scale``) per
vector: log_sigma ≈ offset + q · step. log_sigma sits in a narrow band away from 0 (a symmetric scale would
spend most of its levels on values it never holds), so 4 bits keep sigma within about 1% (mean) of the
float32 value; mu stays at 8 bits. docs/performance.md, 'Latent storage: bits per value' has the
measurement that chose it.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

LATENT_DTYPES = ("bf16", "int8", "int8-ls4")


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even); returns the bits as uint16."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    bias = ((u >> 16) & 1) + np.uint32(0x7FFF)
    return ((u + bias) >> 16).astype(np.uint16)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [..., d] float32 → (q int8 [..., d], scale float16 [...]) with x ≈ q · scale."""
    x = np.asarray(x, dtype=np.float32)
    absmax = np.abs(x).max(axis=-1)
    scale = (absmax / 127.0).astype(np.float16)
    if not np.isfinite(scale).all():
        raise ValueError("latent values too large for an int8 scale in float16 (|x| > 8e6)")
    s = scale.astype(np.float32)[..., None]
    q = np.where(s > 0, np.rint(x / np.where(s > 0, s, 1.0)), 0.0)
    return np.clip(q, -127, 127).astype(np.int8), scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale.astype(np.float32)[..., None]


def quantize_uint4(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [..., d] float32 → (q uint8 [..., d] in [0, 15], offset float16 [...], step float16 [...]) with
    x ≈ offset + q · step (offset: the vector's minimum, step: its range / 15)."""
    x = np.asarray(x, dtype=np.float32)
    offset = x.min(axis=-1).astype(np.float16)
    step = ((x.max(axis=-1) - offset.astype(np.float32)) / 15.0).astype(np.float16)
    if not (np.isfinite(offset).all() and np.isfinite(step).all()):
        raise ValueError("latent values too large for a 4-bit offset and step in float16 (|x| > 6e4)")
    lo, s = offset.astype(np.float32)[..., None], step.astype(np.float32)[..., None]
    q = np.where(s > 0, np.rint((x - lo) / np.where(s > 0, s, 1.0)), 0.0)
    return np.clip(q, 0, 15).astype(np.uint8), offset, step


def dequantize_uint4(q: np.ndarray, offset: np.ndarray, step: np.ndarray) -> np.ndarray:
    return offset.astype(np.float32)[..., None] + q.astype(np.float32) * step.astype(np.float32)[..., None]


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """[n, m] codes in [0, 15] → [n, ceil(m / 2)] bytes: code 2i in the low nibble of byte i, 2i+1 in the high."""
    n, m = q.shape
    if m % 2:
        q = np.concatenate([q, np.zeros((n, 1), np.uint8)], axis=1)
    q = q.astype(np.uint8)
    return np.ascontiguousarray(q[:, 0::2] | (q[:, 1::2] << 4))


def unpack_nibbles(packed: np.ndarray, m: int) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`: [n, ceil(m / 2)] bytes → [n, m] codes."""
    packed = np.asarray(packed, dtype=np.uint8)
    out = np.empty((len(packed), 2 * packed.shape[1]), np.uint8)
    out[:, 0::2], out[:, 1::2] = packed & 0x0F, packed >> 4
    return out[:, :m]


def _ls4(dtype: str, name: str) -> bool:
    return dtype == "int8-ls4" and name == "log_sigma"


def tensor_columns(dtype: str, name: str, seq_chunks: int, latent_dim: int) -> list[tuple[str, pa.DataType, int]]:
    """(column, element type, values per row) of one tensor, in stored order."""
    n = seq_chunks * latent_dim
    if dtype == "bf16":
        return [(name, pa.uint16(), n)]
    if _ls4(dtype, name):
        return [(name, pa.uint8(), (n + 1) // 2), (f"{name}_offset", pa.float16(), seq_chunks),
                (f"{name}_scale", pa.float16(), seq_chunks)]
    return [(name, pa.int8(), n), (f"{name}_scale", pa.float16(), seq_chunks)]


def tensor_row_bytes(dtype: str, name: str, seq_chunks: int, latent_dim: int) -> int:
    return sum(width * t.byte_width for _, t, width in tensor_columns(dtype, name, seq_chunks, latent_dim))


def encode_tensor(dtype: str, name: str, x: np.ndarray) -> dict:
    """x [n, L, d] float32 (finite) → its stored columns, each [n, width], C-contiguous."""
    n, m = len(x), x.shape[1] * x.shape[2]  # (not -1: a call may add no samples)
    if dtype == "bf16":
        return {name: f32_to_bf16_bits(x).reshape(n, m)}
    if _ls4(dtype, name):
        q, offset, step = quantize_uint4(x)
        return {name: pack_nibbles(q.reshape(n, m)), f"{name}_offset": np.ascontiguousarray(offset),
                f"{name}_scale": np.ascontiguousarray(step)}
    q, s = quantize_int8(x)
    return {name: q.reshape(n, m), f"{name}_scale": np.ascontiguousarray(s)}


def decode_tensor(dtype: str, name: str, stored: dict, rows, seq_chunks: int, latent_dim: int) -> np.ndarray:
    """The selected rows of one tensor's stored columns → float32 [n, L, d]."""
    shape = (-1, seq_chunks, latent_dim)
    x = stored[name][rows]
    if dtype == "bf16":
        return bf16_bits_to_f32(x).reshape(shape)
    if _ls4(dtype, name):
        q = unpack_nibbles(x, seq_chunks * latent_dim)
        return dequantize_uint4(q.reshape(shape), stored[f"{name}_offset"][rows], stored[f"{name}_scale"][rows])
    return dequantize_int8(x.reshape(shape), stored[f"{name}_scale"][rows])


def metadata_columns(dtype: str, seq_chunks: int, latent_dim: int) -> list[str]:
    """The float16 scale/offset columns of a latent dtype (checked finite on read)."""
    return [c for name in ("mu", "log_sigma") for c, t, _ in tensor_columns(dtype, name, seq_chunks, latent_dim)
            if t == pa.float16()]
