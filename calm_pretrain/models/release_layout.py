"""The published release layout's generic part: file names, constants, errors, dtypes, and the base of
the per-architecture release adapters (docs/release.md, 'The published layout').

A leaf module: it imports torch only, so the adapters in the architecture packages
(``calm_pretrain/models/<arch>/release.py``) can import it without importing the rest of the release code.
What one architecture's release looks like (its published names, config.json keys, parameter names)
lives in its adapter, never here."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch

CONFIG_NAME = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
GENERATION_CONFIG = "generation_config.json"
SIDECAR_NAME = "calm_pretrain.json"
SIDECAR_VERSION = 1
# The reference code pins transformers 4.43.0; the field is informational for every loader.
TRANSFORMERS_VERSION = "4.43.0"

# Keys HF tooling writes that describe the file, not the computation; never reported as unknown.
HF_BOOKKEEPING = ("architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
                  "auto_map", "head_dim", "rope_parameters")

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
               torch.float64: "float64"}


class ReleaseError(ValueError):
    """A release directory that cannot be written or read; the message names the file."""


class ReleaseWarning(UserWarning):
    """Something a user should know about a release that still loads or exports (unverified, unknown
    config fields, a fallback to an older checkpoint, stale temporary directories removed)."""


def dtype_of(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype holding most elements (the ``torch_dtype`` a release declares)."""
    counts: dict[torch.dtype, int] = {}
    for t in state.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in DTYPE_NAMES:
        raise ReleaseError(f"cannot export weights of dtype {dtype}; use one of {sorted(DTYPE_NAMES.values())}")
    return DTYPE_NAMES[dtype]


def few(names, n: int = 5) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_meta or b.is_meta:  # header-only inspection: values unknown
        return a.shape == b.shape
    return a.shape == b.shape and torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# Helpers of the adapters' config mapping
# --------------------------------------------------------------------------------------------
def require_keys(values: dict, keys, cfg_path: Path) -> None:
    missing = [k for k in keys if values.get(k) is None]
    if missing:
        raise ReleaseError(f"{cfg_path}: missing key(s) {', '.join(missing)} (the reference code would fall back "
                           f"to defaults that do not match the weights)")


def check_constants(values: dict, constants: dict, cfg_path: Path, keys=None) -> None:
    """Refuse features our modules do not implement (they would load and compute something else)."""
    for key in keys or ("hidden_act", "rope_scaling", "attention_bias", "mlp_bias"):
        allowed = ("silu", "swish") if key == "hidden_act" else (constants[key],)  # HF: swish is SiLU
        if key == "rope_scaling" and isinstance(values.get(key), dict):
            allowed += (values[key],) if values[key].get("rope_type", values[key].get("type")) == "default" else ()
        if key in values and values[key] not in allowed:
            raise ReleaseError(f"{cfg_path}: {key} = {values[key]!r} is not supported (only {constants[key]!r})")


def _token_id(value: Any) -> Any:
    # HF allows a list of end ids (Llama-3 instruct); our configs hold one id: the first is the primary.
    return value[0] if isinstance(value, list) and value else value


def mapped(values: dict, fields) -> dict:
    """Our field values from release keys (absent or null keys are left to the defaults)."""
    out = {}
    for key, ours in fields:
        if values.get(key) is not None:
            out[ours] = _token_id(values[key]) if key.endswith("token_id") else values[key]
    return out


# --------------------------------------------------------------------------------------------
# The release adapter: one object per architecture, its ModelSpec's `release`
# --------------------------------------------------------------------------------------------
class ReleaseAdapter:
    """How one architecture is published: our config ↔ ``config.json`` and our parameter names ↔ the
    published ones. The generic release code (calm_pretrain/release/) finds it by the published name
    (``config.json`` → ``architectures``) or by ``spec_of(cfg).release``. The defaults describe a model
    published under our own parameter names with no generation config and no embedded autoencoder."""

    published_names: tuple = ()   # config.json `architectures[0]` values it reads; the first is the default
    model_types: tuple = ()       # config.json `model_type` values that name it when `architectures` is absent
    embedded_ae_prefix: Optional[str] = None  # where its weights may hold a copy of its autoencoder ...
    autoencoder: Optional["ReleaseAdapter"] = None  # ... in that autoencoder's layout

    def published_name(self, cfg) -> str:
        """The `architectures` entry of a release of `cfg`."""
        return self.published_names[0]

    def known_config_keys(self, name: str) -> set[str]:
        """The config.json keys (besides HF's bookkeeping) a release named `name` may carry."""
        raise NotImplementedError

    def release_config(self, cfg) -> dict:
        """The architecture's config.json keys of `cfg` (the generic code adds architectures, dtype, version)."""
        raise NotImplementedError

    def config_dict(self, values: dict, name: str, base: dict, cfg_path: Path) -> dict:
        """Our model config, as a dict, from a config.json named `name` and our sidecar's entry `base`."""
        raise NotImplementedError

    def generation_config(self, cfg) -> Optional[dict]:
        """``generation_config.json`` of a release of `cfg`; None: none is written."""
        return None

    def to_release_name(self, name: str) -> str:
        return name

    def complete_state(self, state: dict, where: str) -> None:
        """Fill in (and check) the names one of our state dicts may lack (a tie's second name)."""

    def from_release(self, tensors: dict, where: str, name: str, tie_word_embeddings: bool = False):
        """Release tensors → (our state dict, embedded autoencoder's state dict or None)."""
        tensors = dict(tensors)
        self.complete_state(tensors, where)
        return tensors, None

    def to_release(self, cfg, state: Mapping[str, torch.Tensor], ae_state=None) -> dict:
        """Our state dict (+ an embedded autoencoder's) → {release name: tensor}, every alias included."""
        out = {self.to_release_name(k): v for k, v in state.items()}
        if ae_state is not None:
            out.update({self.embedded_ae_prefix + k: v for k, v in ae_state.items()})
        return out

    def check_loaded(self, model, where: str) -> None:
        """Refuse a loaded model that lost what its layout promises (a tie)."""

    def unique_parameters(self, state: Mapping[str, torch.Tensor]) -> int:
        """Parameters of a state dict in this layout, a tied pair counted once."""
        return sum(t.numel() for t in state.values())

    def embedded_ae_config(self, ae_state: Mapping[str, torch.Tensor], cfg, where: str) -> dict:
        """The embedded autoencoder's config (a dict) from its tensors, when no file says it."""
        raise ReleaseError(f"{where}: holds no autoencoder")

    def card_rows(self, cfg) -> list[tuple]:
        """(field, value) rows of the model card's architecture table, after the architecture and vocabulary."""
        return []
