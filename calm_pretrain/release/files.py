"""Reading a release's files: config.json (+ our sidecar) and the weights (safetensors, or pickled
``pytorch_model.bin`` through torch's restricted unpickler only)."""
from __future__ import annotations

import json
import re
from pathlib import Path
import os
from typing import Optional

import torch

from calm_pretrain.models.release_layout import (BIN_INDEX, BIN_WEIGHTS, CONFIG_NAME, SAFE_INDEX, SAFE_WEIGHTS, SIDECAR_NAME,
                                          SIDECAR_VERSION, ReleaseError, few)


def read_config(d: Path) -> tuple[dict, Optional[dict], Path]:
    cfg_path = d / CONFIG_NAME
    if not d.is_dir():
        raise ReleaseError(f"{d}: no such release directory")
    if not cfg_path.is_file():
        raise ReleaseError(f"{cfg_path}: missing (a release directory needs {CONFIG_NAME} beside the weights)")
    try:
        values = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReleaseError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(values, dict):
        raise ReleaseError(f"{cfg_path}: top level must be an object")
    sidecar = None
    side_path = d / SIDECAR_NAME
    if side_path.is_file():
        try:
            sidecar = json.loads(side_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ReleaseError(f"{side_path}: not valid JSON ({e})") from None
        if not isinstance(sidecar, dict) or sidecar.get("calm_pretrain_release") != SIDECAR_VERSION:
            raise ReleaseError(f"{side_path}: not a calm_pretrain release description of version {SIDECAR_VERSION}")
    return values, sidecar, cfg_path


def _load_safetensors(path: Path, header_only: bool) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if not header_only:
                return {k: f.get_tensor(k) for k in f.keys()}
            out = {}
            for k in f.keys():
                s = f.get_slice(k)
                dtype = getattr(torch, {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64",
                                        "I64": "int64", "I32": "int32"}.get(s.get_dtype(), "float32"))
                out[k] = torch.empty(s.get_shape(), dtype=dtype, device="meta")
            return out
    except Exception as e:  # noqa: BLE001 - safetensors raises SafetensorError/OSError for broken files
        raise ReleaseError(f"{path}: cannot read safetensors weights ({e})") from None


def _unpickling_reason(e: Exception) -> str:
    """The informative part of torch's long weights-only message (which global was refused)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch decorates the message with terminal colours
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip().split(". ")[0]
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A ``pytorch_model.bin``: a pickle, so only torch's restricted unpickler (tensors and plain
    containers) may read it; anything else is refused, never executed."""
    import pickle

    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        raise ReleaseError(f"{path}: refusing to load: it holds more than tensors, and untrusted pickles are "
                           f"never executed (torch.load weights_only=True: {_unpickling_reason(e)})") from None
    except Exception as e:  # noqa: BLE001 - truncated / not a torch file
        raise ReleaseError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ReleaseError(f"{path}: not a state dict (expected a mapping of names to tensors)")
    return obj


def weight_files(d: Path) -> tuple[str, list[Path]]:
    """("safetensors" | "pytorch", the files to read). safetensors first, as transformers prefers it."""
    for fmt, single, index in (("safetensors", SAFE_WEIGHTS, SAFE_INDEX), ("pytorch", BIN_WEIGHTS, BIN_INDEX)):
        if (d / single).is_file():
            return fmt, [d / single]
        if (d / index).is_file():
            try:
                weight_map = json.loads((d / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise ReleaseError(f"{d / index}: not a valid shard index ({type(e).__name__}: {e})") from None
            files = sorted(set(weight_map.values()))
            for f in files:
                if not (d / f).is_file():
                    raise ReleaseError(f"{d / index}: shard {f} is missing")
            return fmt, [d / index] + [d / f for f in files]
    raise ReleaseError(f"{d}: no weights ({SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} or {BIN_INDEX})")


def read_release_tensors(d: str | os.PathLike, header_only: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of a release under their file names, and a description of where they came from.
    ``header_only`` (safetensors) returns meta tensors: names, shapes and dtypes without reading data."""
    d = Path(d)
    fmt, files = weight_files(d)
    load = (lambda p: _load_safetensors(p, header_only)) if fmt == "safetensors" else _load_bin
    if len(files) == 1:
        return load(files[0]), str(files[0])
    index, shards = files[0], files[1:]
    weight_map = json.loads(index.read_text())["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        part = load(shard)
        for k, v in part.items():
            if weight_map.get(k) != shard.name:
                raise ReleaseError(f"{shard}: holds {k}, which {index.name} does not place in this shard")
            tensors[k] = v
    absent = [k for k in weight_map if k not in tensors]
    if absent:
        raise ReleaseError(f"{index}: lists tensor(s) missing from their shards: {few(sorted(absent))}")
    return tensors, str(index)

