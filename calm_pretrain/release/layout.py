"""The published release layout: file names, architectures, and the mapping between our config
dataclasses and the reference ``config.json`` (docs/release.md, 'The published layout')."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from calm_pretrain.config import ConfigError, model_config_from_dict
from calm_pretrain.models.autoencoder import AutoencoderConfig
from calm_pretrain.models.calm import CALMConfig
from calm_pretrain.models.transformer import TransformerConfig

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

ARCH_AE = "Autoencoder"
ARCH_CALM = "EnergyTransformer"
ARCH_CALM_OTHER_HEAD = "CALM"  # our non-energy heads: same layout, head names of ours, needs the sidecar
ARCH_LLAMA = "LlamaForCausalLM"
KNOWN_ARCHITECTURES = (ARCH_AE, ARCH_CALM, ARCH_CALM_OTHER_HEAD, ARCH_LLAMA)

AE_TIED = ("encoder.embed_tokens.weight", "decoder.lm_head_weight")
HEAD_PREFIX, HEAD_ALIAS_PREFIX, AE_PREFIX = "mlp_generator.", "generative_head.", "ae_model."

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
                torch.float64: "float64"}
_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


class ReleaseError(ValueError):
    """A release directory that cannot be written or read; the message names the file."""


class ReleaseWarning(UserWarning):
    """Something a user should know about a release that still loads or exports (unverified, unknown
    config fields, a fallback to an older checkpoint, stale temporary directories removed)."""


# --------------------------------------------------------------------------------------------
# Config mapping: our dataclasses ↔ the reference config.json
# --------------------------------------------------------------------------------------------
# (release key, our field). Explicit, because several names differ (patch_size = k, beta = alpha, ...).
_AE_FIELDS = [
    ("patch_size", "k"), ("latent_size", "latent_dim"), ("vocab_size", "vocab_size"),
    ("hidden_size", "hidden_size"), ("intermediate_size", "intermediate_size"),
    ("num_encoder_layers", "num_encoder_layers"), ("num_decoder_layers", "num_decoder_layers"),
    ("rms_norm_eps", "norm_eps"), ("ae_dropout", "token_mask_prob"), ("kl_clamp", "kl_clamp"),
    ("kl_weight", "kl_weight"), ("initializer_range", "init_std"),
    ("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "pad_token_id"),
]
# What the reference AE hard-wires (no field of ours): SwiGLU with SiLU, no MLP biases, the tie is not
# HF's tie_word_embeddings, max_position_embeddings is unused.
_AE_CONSTANTS = {"hidden_act": "silu", "mlp_bias": False, "pretraining_tp": 1, "max_position_embeddings": 2048,
                 "tie_word_embeddings": False}
_AE_REQUIRED = ("patch_size", "latent_size", "vocab_size", "hidden_size", "intermediate_size",
                "num_encoder_layers", "num_decoder_layers")

_BACKBONE_FIELDS = [
    ("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"), ("intermediate_size", "intermediate_size"),
    ("num_hidden_layers", "num_layers"), ("num_attention_heads", "num_heads"),
    ("num_key_value_heads", "num_kv_heads"), ("rms_norm_eps", "norm_eps"), ("rope_theta", "rope_theta"),
    ("max_position_embeddings", "max_position_embeddings"), ("initializer_range", "init_std"),
    ("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "pad_token_id"),
]
# Llama features our backbone does not implement: the exporter writes these values and the importer
# refuses any other (loading would silently compute something else).
_LLAMA_CONSTANTS = {"hidden_act": "silu", "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
                    "mlp_bias": False, "pretraining_tp": 1, "use_cache": True, "tie_word_embeddings": False}
_BACKBONE_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

_CALM_FIELDS = [("patch_size", "k"), ("latent_size", "latent_dim"), ("ae_path", "ae_path")]
_HEAD_FIELDS = [("noise_size", "noise_size"), ("num_mlp_layers", "num_blocks"), ("num_samples", "num_samples"),
                ("beta", "alpha")]
_CALM_REQUIRED = _BACKBONE_REQUIRED + ("patch_size", "latent_size", "noise_size", "num_mlp_layers")


# Keys HF tooling writes that describe the file, not the computation; never reported as unknown.
_HF_BOOKKEEPING = ("architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
                   "auto_map", "head_dim", "rope_parameters")


def known_config_keys(arch: str) -> set[str]:
    """The config.json keys a release of `arch` may carry; any other key is ignored by every loader
    of ours, so a setting put there would silently have no effect."""
    keys = set(_HF_BOOKKEEPING)
    if arch == ARCH_AE:
        return keys | {k for k, _ in _AE_FIELDS} | set(_AE_CONSTANTS)
    keys |= {k for k, _ in _BACKBONE_FIELDS} | set(_LLAMA_CONSTANTS)
    if arch != ARCH_LLAMA:
        keys |= {k for k, _ in _CALM_FIELDS + _HEAD_FIELDS}
    return keys


def _dtype_of(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype holding most elements (the ``torch_dtype`` a release declares)."""
    counts: dict[torch.dtype, int] = {}
    for t in state.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        raise ReleaseError(f"cannot export weights of dtype {dtype}; use one of {sorted(_DTYPE_NAMES.values())}")
    return _DTYPE_NAMES[dtype]


def architecture_of(cfg) -> str:
    if isinstance(cfg, AutoencoderConfig):
        return ARCH_AE
    if isinstance(cfg, CALMConfig):
        return ARCH_CALM if cfg.head.type == "energy" else ARCH_CALM_OTHER_HEAD
    if isinstance(cfg, TransformerConfig):
        return ARCH_LLAMA
    raise ReleaseError(f"no release architecture for config type {type(cfg).__name__}")


def release_config(cfg, dtype: torch.dtype = torch.float32) -> dict:
    """The ``config.json`` dict of a release of a model with config `cfg` and weights of `dtype`."""
    arch = architecture_of(cfg)
    out: dict[str, Any] = {"architectures": [arch]}
    if arch == ARCH_AE:
        out.update({key: getattr(cfg, ours) for key, ours in _AE_FIELDS})
        out.update(_AE_CONSTANTS)
    else:
        out.update({key: getattr(cfg, ours) for key, ours in _BACKBONE_FIELDS})
        out.update(_LLAMA_CONSTANTS)
        if arch == ARCH_LLAMA:
            # HF reads model_type to pick the class; the reference CALM configs must not carry it
            # (docs/release.md, 'CALM config.json').
            out["model_type"] = "llama"
            out["head_dim"] = cfg.hidden_size // cfg.num_heads
        else:
            out.update({key: getattr(cfg, ours) for key, ours in _CALM_FIELDS})
            out.update({key: getattr(cfg.head, ours) for key, ours in _HEAD_FIELDS})
    out["torch_dtype"] = _dtype_name(dtype)
    out["transformers_version"] = TRANSFORMERS_VERSION
    return dict(sorted(out.items()))  # HF writes its config keys sorted


def _generation_config(cfg) -> dict:
    return {"_from_model_config": True, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
            "pad_token_id": cfg.pad_token_id, "transformers_version": TRANSFORMERS_VERSION}


def _detect_architecture(values: dict, cfg_path: Path) -> str:
    archs = values.get("architectures")
    if isinstance(archs, list) and archs:
        if archs[0] in KNOWN_ARCHITECTURES:
            return archs[0]
        raise ReleaseError(f"{cfg_path}: unknown architecture {archs[0]!r}; "
                           f"supported: {', '.join(KNOWN_ARCHITECTURES)}")
    if "arch" in values:  # our own AE directory format (data_pipeline.ae_io): config.json = the dataclass
        return "native"
    model_type = values.get("model_type")
    if model_type == "llama":
        return ARCH_LLAMA
    if model_type == "energy":
        return ARCH_CALM
    raise ReleaseError(f"{cfg_path}: unknown architecture (no 'architectures' entry, model_type={model_type!r}); "
                       f"supported: {', '.join(KNOWN_ARCHITECTURES)}")


def _require(values: dict, keys, cfg_path: Path) -> None:
    missing = [k for k in keys if values.get(k) is None]
    if missing:
        raise ReleaseError(f"{cfg_path}: missing key(s) {', '.join(missing)} (the reference code would fall back "
                           f"to defaults that do not match the weights)")


def _check_constants(values: dict, constants: dict, cfg_path: Path, keys=None) -> None:
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


def _mapped(values: dict, fields) -> dict:
    """Our field values from release keys (absent or null keys are left to the defaults)."""
    out = {}
    for key, ours in fields:
        if values.get(key) is not None:
            out[ours] = _token_id(values[key]) if key.endswith("token_id") else values[key]
    return out


def model_config_from_release(values: dict, sidecar: Optional[dict], cfg_path: Path, *, key: str = "model"):
    """Our model config from a release ``config.json`` dict (+ the optional sidecar entry `key`)."""
    arch = _detect_architecture(values, cfg_path)
    base = dict((sidecar or {}).get(key) or {})
    if arch == "native":
        merged = dict(values)
    elif arch == ARCH_AE:
        _require(values, _AE_REQUIRED, cfg_path)
        _check_constants(values, _AE_CONSTANTS, cfg_path, ("hidden_act", "mlp_bias"))
        merged = {**base, **_mapped(values, _AE_FIELDS), "arch": "autoencoder"}
        # The reference uses one ae_dropout for token masking and latent dropout; ours may differ (sidecar).
        if "latent_dropout" not in base and values.get("ae_dropout") is not None:
            merged["latent_dropout"] = values["ae_dropout"]
    else:
        _require(values, _BACKBONE_REQUIRED if arch == ARCH_LLAMA else _CALM_REQUIRED, cfg_path)
        _check_constants(values, _LLAMA_CONSTANTS, cfg_path)
        heads, hidden = values["num_attention_heads"], values["hidden_size"]
        if values.get("head_dim") is not None and values["head_dim"] * heads != hidden:
            raise ReleaseError(f"{cfg_path}: head_dim = {values['head_dim']} with {heads} heads does not give "
                               f"hidden_size {hidden} (not supported)")
        mapped = _mapped(values, _BACKBONE_FIELDS)
        mapped.setdefault("num_kv_heads", heads)  # HF: a missing num_key_value_heads means MHA
        rope = values.get("rope_parameters")  # transformers >= 5 writes rope_theta inside this dict
        if isinstance(rope, dict):
            if rope.get("rope_type", "default") != "default":
                raise ReleaseError(f"{cfg_path}: rope_parameters {rope} are not supported (only plain RoPE)")
            if rope.get("rope_theta") is not None:
                mapped["rope_theta"] = rope["rope_theta"]
        if values.get("pad_token_id") is None and "pad_token_id" not in base and "eos_token_id" in mapped:
            mapped["pad_token_id"] = mapped["eos_token_id"]  # HF Llamas often have no pad: pad with eos, as usual
        if arch == ARCH_LLAMA:
            merged = {**base, **mapped, "arch": "transformer"}
        else:
            if arch == ARCH_CALM and values.get("model_type") not in (None, "", "energy"):
                raise ReleaseError(f"{cfg_path}: model_type {values['model_type']!r} with architecture {arch}; "
                                   f"only the energy head's layout is supported")
            head = dict(base.get("head") or {})
            if arch == ARCH_CALM:
                head["type"] = "energy"
            elif "type" not in head:
                raise ReleaseError(f"{cfg_path}: architecture {arch} needs the head type from {SIDECAR_NAME}, "
                                   f"which is missing")
            head.update(_mapped(values, _HEAD_FIELDS))
            merged = {**base, **mapped, **_mapped(values, _CALM_FIELDS), "head": head, "arch": "calm"}
            merged["ae_path"] = values.get("ae_path")  # an explicit null in config.json wins over the sidecar
    if base.get("arch") not in (None, merged.get("arch")):
        raise ReleaseError(f"{cfg_path.parent / SIDECAR_NAME}: describes a {base['arch']} model but "
                           f"{cfg_path.name} a {merged['arch']} one")
    try:
        return model_config_from_dict(merged)
    except ConfigError as e:
        source = f"{cfg_path} with {SIDECAR_NAME}" if base else str(cfg_path)
        raise ReleaseError(f"{source}: not a valid configuration ({e})") from None


