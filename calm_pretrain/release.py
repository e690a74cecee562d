"""Release checkpoints: export to and import from the layout of the published CALM checkpoints.

A release directory holds what the reference modeling code (``shaochenze/calm``) and HF tooling read
(docs/release.md, 'The published layout', documents every key and tensor name):

- ``config.json``: the reference config fields, mapped from our config dataclasses
  (``Autoencoder`` → ``AutoencoderConfig`` keys, ``EnergyTransformer`` → ``CALMConfig`` keys, the
  Transformer baseline → an HF ``LlamaForCausalLM`` config);
- ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``):
  the weights under the reference parameter names, every tied/aliased name as its own tensor
  (safetensors cannot share storage, and the layout shows that dropping a tied name breaks the reference
  loader silently);
- ``generation_config.json`` (CALM and Llama), the tokenizer files when a tokenizer is given;
- ``calm_pretrain.json``: our full model config(s). The reference ``config.json`` cannot express every
  field of ours (the AE's separate latent dropout, the head's number of target samples, non-energy head
  types, ...), so that file carries them. The reference code ignores it; ``config.json`` stays exactly the
  documented key set and wins for every field it has.

Import reads our own releases, the reference pipeline's output (``pytorch_model.bin``, possibly sharded
with ``pytorch_model.bin.index.json``, loaded with ``torch.load(weights_only=True)``: no untrusted pickle
is ever executed) and HF Llama checkpoints, and checks names and shapes before anything is loaded.

Name mapping (ours → release): the autoencoder and CALM modules already use the release names, so they
map to themselves; CALM additionally writes the reference's alias ``generative_head.*`` of the head and,
optionally, the frozen AE under ``ae_model.*``. The Transformer baseline maps ``transformer.*`` → ``model.*``
(HF ``LlamaForCausalLM``); ``lm_head.weight`` keeps its name.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import nn

from calm_pretrain.config import (AutoencoderConfig, CALMConfig, ConfigError, TransformerConfig,
                                  model_config_from_dict)

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


# --------------------------------------------------------------------------------------------
# Parameter names: ours ↔ release
# --------------------------------------------------------------------------------------------
_PREFIX_MAPS = {ARCH_LLAMA: [("transformer.", "model."), ("lm_head.", "lm_head.")]}


def to_release_name(arch: str, name: str) -> str:
    for ours, theirs in _PREFIX_MAPS.get(arch, []):
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


def from_release_name(arch: str, name: str) -> Optional[str]:
    """Our name for a release name, or None when it has no counterpart."""
    maps = _PREFIX_MAPS.get(arch)
    if maps is None:
        return name
    for ours, theirs in maps:
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    return None


def _few(names, n: int = 5) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def check_tensors(got: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], where: str,
                  arch: str = ARCH_AE) -> None:
    """Same names and shapes, or one error listing a few missing / unexpected / mismatched names
    (release names, as they appear in the file)."""
    missing = [to_release_name(arch, k) for k in expected if k not in got]
    unexpected = [to_release_name(arch, k) for k in got if k not in expected]
    mismatched = [f"{to_release_name(arch, k)} {tuple(got[k].shape)} (expected {tuple(expected[k])})"
                  for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_few(sorted(missing))}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_few(sorted(unexpected))}")
    if mismatched:
        problems.append(f"shape mismatch in {len(mismatched)} tensor(s): {_few(mismatched)}")
    if problems:
        raise ReleaseError(f"{where}: " + "; ".join(problems))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_meta or b.is_meta:  # header-only inspection: values unknown
        return a.shape == b.shape
    return a.shape == b.shape and torch.equal(a, b)


def _fill_ae_tie(state: dict, where: str) -> None:
    """Our AE holds one Parameter under both tied names, so either name alone suffices to load it (our
    exports always write both, which the reference loader needs: docs/release.md, 'The tied AE embedding'); when
    both are given they must agree."""
    a, b = AE_TIED
    if a in state and b in state:
        if not _same(state[a], state[b]):
            raise ReleaseError(f"{where}: {a} and {b} differ, but they are one tied weight")
    elif a in state:
        state[b] = state[a]
    elif b in state:
        state[a] = state[b]


def split_release_state(arch: str, tensors: dict, where: str, tie_word_embeddings: bool = False):
    """Release tensors → (our state dict, embedded AE state dict or None). Resolves ties and aliases."""
    tensors = dict(tensors)
    if arch in (ARCH_AE, "native"):
        _fill_ae_tie(tensors, where)
        return tensors, None
    if arch == ARCH_LLAMA:
        # Older HF files carry RoPE's inv_freq (recomputed from the config, never a weight).
        tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
        if tie_word_embeddings and "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        ours, unknown = {}, []
        for k, v in tensors.items():
            name = from_release_name(arch, k)
            if name is None:
                unknown.append(k)
            else:
                ours[name] = v
        if unknown:
            raise ReleaseError(f"{where}: unexpected {len(unknown)} tensor(s): {_few(sorted(unknown))}")
        return ours, None
    # CALM: the AE copy and the head alias are optional (docs/release.md, 'How a CALM finds its AE'); if both
    # head names are present they are one module in the reference and must hold the same values.
    ae = {k[len(AE_PREFIX):]: v for k, v in tensors.items() if k.startswith(AE_PREFIX)} or None
    ours = {k: v for k, v in tensors.items() if not k.startswith((AE_PREFIX, HEAD_ALIAS_PREFIX))}
    for k, v in tensors.items():
        if k.startswith(HEAD_ALIAS_PREFIX):
            name = HEAD_PREFIX + k[len(HEAD_ALIAS_PREFIX):]
            if name in ours:
                if not _same(ours[name], v):
                    raise ReleaseError(f"{where}: {name} and {k} differ, but they are one module")
            else:
                ours[name] = v
    if ae is not None:
        _fill_ae_tie(ae, where)
    return ours, ae


def release_state(cfg, state: Mapping[str, torch.Tensor], ae_state: Optional[Mapping[str, torch.Tensor]] = None):
    """Our state dict → {release name: tensor}, with every alias the reference layout has."""
    arch = architecture_of(cfg)
    out = {to_release_name(arch, k): v for k, v in state.items()}
    if arch == ARCH_CALM:
        for k, v in state.items():
            if k.startswith(HEAD_PREFIX):  # two names in the reference: docs/release.md, 'CALM parameter names'
                out[HEAD_ALIAS_PREFIX + k[len(HEAD_PREFIX):]] = v
    if ae_state is not None:
        out.update({AE_PREFIX + k: v for k, v in ae_state.items()})
    return out


def expected_shapes(cfg) -> dict[str, torch.Size]:
    """{our name: shape} of the model `cfg` describes (built on the meta device: nothing allocated)."""
    from calm_pretrain.models import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
@contextmanager
def _atomic_directory(out_dir: Path) -> Iterator[Path]:
    """Yields a fresh temporary directory beside `out_dir`; on success it replaces `out_dir`, on any
    error (or interrupt) it is removed and `out_dir` is left as it was."""
    from data_pipeline.files import fsync_dir, fsync_file

    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ReleaseError(f"{out_dir}: exists and is not a directory")
        # Replacing is meant for re-exporting a release; never wipe an unrelated directory.
        if any(out_dir.iterdir()) and not (out_dir / CONFIG_NAME).is_file():
            raise ReleaseError(f"{out_dir}: exists, is not empty and holds no {CONFIG_NAME}; refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{tag}")
    tmp.mkdir()
    try:
        yield tmp
        for p in tmp.iterdir():
            if p.is_file():
                fsync_file(p)
        fsync_dir(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{tag}")
            os.replace(out_dir, old)
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                os.replace(old, out_dir)  # put the previous release back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _separate_tensors(state: Mapping[str, torch.Tensor], dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, cast if asked, and no two tensors sharing memory (safetensors refuses shared
    storage; the tied/aliased names must become separate tensors with identical values)."""
    out, seen = {}, set()
    for name, t in state.items():
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.to("cpu").contiguous()
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a second name for one storage, or a view into a larger one
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _write_safetensors(d: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: Optional[int]) -> list[str]:
    import safetensors.torch  # module attribute looked up at call time (tests interrupt it)

    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    names = sorted(tensors)
    sizes = {k: tensors[k].numel() * tensors[k].element_size() for k in names}
    if max_shard_bytes is None or sum(sizes.values()) <= max_shard_bytes:
        safetensors.torch.save_file(tensors, str(d / SAFE_WEIGHTS), metadata=metadata)
        return [SAFE_WEIGHTS]
    shards: list[list[str]] = [[]]
    used = 0
    for k in names:  # greedy, in name order, as HF's shard_checkpoint does; a big tensor gets its own shard
        if shards[-1] and used + sizes[k] > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(k)
        used += sizes[k]
    files, weight_map = [], {}
    for i, keys in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        safetensors.torch.save_file({k: tensors[k] for k in keys}, str(d / fname), metadata=metadata)
        files.append(fname)
        weight_map.update({k: fname for k in keys})
    _write_json(d / SAFE_INDEX, {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})
    return files + [SAFE_INDEX]


def _tokenizer_names(tok) -> tuple:
    backend = tok._tk  # HFTokenizer keeps its `tokenizers.Tokenizer` here
    return tuple(None if i is None else backend.id_to_token(i) for i in (tok.bos_id, tok.eos_id, tok.pad_id))


def save_tokenizer_files(tokenizer, directory: Path) -> None:
    """Write `tokenizer` (a data_pipeline Tokenizer, a spec for ``load_tokenizer``, a transformers tokenizer
    or a ``tokenizers.Tokenizer``) as HF tokenizer files, plus ``special_tokens_map.json`` like the
    reference output."""
    from data_pipeline import tokenizers as dt

    directory = Path(directory)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = dt.load_tokenizer(str(tokenizer))
    if isinstance(tokenizer, dt.HFTokenizer):
        bos, eos, pad = _tokenizer_names(tokenizer)
        tokenizer.save(directory, bos=bos, eos=eos, pad=pad)
    elif isinstance(tokenizer, dt.TiktokenTokenizer):
        # tiktoken has no HF file format: rebuild the equivalent `tokenizers` BPE from the same ranks
        if not tokenizer.spec.startswith("llama3:"):
            raise ReleaseError(f"cannot save tokenizer {tokenizer.spec!r}: only the Llama-3 tiktoken ranks "
                               f"can be converted to tokenizer.json")
        dt.save_llama3_hf(directory, tokenizer.spec.split(":", 1)[1])
    elif isinstance(tokenizer, dt.TransformersTokenizer):
        tokenizer._tk.save_pretrained(str(directory))
    elif hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(directory))
    elif type(tokenizer).__module__.startswith("tokenizers") and hasattr(tokenizer, "save"):
        tokenizer.save(str(directory / "tokenizer.json"))
    else:
        raise ReleaseError(f"cannot save a tokenizer of type {type(tokenizer).__name__}")
    special_map, tok_cfg = directory / "special_tokens_map.json", directory / "tokenizer_config.json"
    if not special_map.exists() and tok_cfg.is_file():
        cfg = json.loads(tok_cfg.read_text())
        specials = {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token") if isinstance(cfg.get(k), str)}
        _write_json(special_map, specials)


def export_state_dict(state_dict: Mapping[str, torch.Tensor], model_config, out_dir: str | os.PathLike,
                      tokenizer=None, *, ae_state_dict: Optional[Mapping[str, torch.Tensor]] = None,
                      ae_config: Optional[AutoencoderConfig] = None, dtype: Optional[torch.dtype] = None,
                      max_shard_bytes: Optional[int] = None) -> Path:
    """Write a release of a consolidated state dict {our parameter name: tensor} with our model config.

    For a CALM model, ``ae_state_dict`` + ``ae_config`` embed the frozen autoencoder under ``ae_model.*``
    (as the reference pipeline does). ``dtype`` casts floating tensors (default: keep; the published
    checkpoints are fp32). ``max_shard_bytes`` splits the weights into several safetensors files with an
    index. The directory appears complete or not at all; an existing release there is replaced.
    """
    cfg = model_config
    arch = architecture_of(cfg)
    out_dir = Path(out_dir)
    where = f"export to {out_dir}"
    state = dict(state_dict)
    if arch == ARCH_AE:
        _fill_ae_tie(state, where)
    check_tensors(state, expected_shapes(cfg), f"{where}: state dict vs the {arch} config", ARCH_AE)
    ae_state = None
    if ae_state_dict is not None or ae_config is not None:
        if not isinstance(cfg, CALMConfig):
            raise ReleaseError(f"{where}: an embedded autoencoder only belongs in a CALM release, not {arch}")
        if ae_state_dict is None or not isinstance(ae_config, AutoencoderConfig):
            raise ReleaseError(f"{where}: embedding the autoencoder needs both its state dict and its config")
        if (ae_config.k, ae_config.latent_dim) != (cfg.k, cfg.latent_dim):
            raise ReleaseError(f"{where}: the autoencoder has K={ae_config.k}, latent {ae_config.latent_dim} but "
                               f"the CALM model K={cfg.k}, latent {cfg.latent_dim}")
        ae_state = dict(ae_state_dict)
        _fill_ae_tie(ae_state, f"{where} (autoencoder)")
        check_tensors(ae_state, expected_shapes(ae_config), f"{where}: autoencoder state dict vs its config")
    tensors = _separate_tensors(release_state(cfg, state, ae_state), dtype)
    sidecar: dict[str, Any] = {"calm_pretrain_release": SIDECAR_VERSION, "architecture": arch,
                               "model": dataclasses.asdict(cfg)}
    if ae_state is not None:
        sidecar["ae_model"] = dataclasses.asdict(ae_config)
    with _atomic_directory(out_dir) as tmp:
        _write_json(tmp / CONFIG_NAME, release_config(cfg, _dtype_of(tensors)))
        _write_json(tmp / SIDECAR_NAME, sidecar)
        if arch != ARCH_AE:
            _write_json(tmp / GENERATION_CONFIG, _generation_config(cfg))
        if tokenizer is not None:
            save_tokenizer_files(tokenizer, tmp)
        _write_safetensors(tmp, tensors, max_shard_bytes)
    return out_dir


def export_release(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, *,
                   ae_model: Optional[nn.Module] = None, dtype: Optional[torch.dtype] = None,
                   max_shard_bytes: Optional[int] = None) -> Path:
    """Write `model` (our Autoencoder, CALM or TransformerLM) as a release directory.

    The autoencoder is its own release (``export_release(ae, dir)``); ``ae_model`` additionally embeds
    a copy of it in a CALM release under ``ae_model.*``, as the reference pipeline writes it.
    """
    ae_state = ae_cfg = None
    if ae_model is not None:
        ae_state, ae_cfg = ae_model.state_dict(), ae_model.config
    return export_state_dict(model.state_dict(), model.config, out_dir, tokenizer, ae_state_dict=ae_state,
                             ae_config=ae_cfg, dtype=dtype, max_shard_bytes=max_shard_bytes)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def _read_config(d: Path) -> tuple[dict, Optional[dict], Path]:
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
        raise ReleaseError(f"{index}: lists tensor(s) missing from their shards: {_few(sorted(absent))}")
    return tensors, str(index)


def _target_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    dt = _dtype_of(state)
    return dt if dt in _DTYPE_NAMES else torch.float32


def _load_into(cfg, state: dict, where: str, arch: str, device, dtype) -> nn.Module:
    from calm_pretrain.models import build_model

    model = build_model(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_tensors(state, expected, where, arch)
    model.to(dtype or _target_dtype(state))  # in place: the AE's tied Parameter stays one object
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # names and shapes were checked; this is e.g. a dtype torch cannot cast
        raise ReleaseError(f"{where}: cannot load weights ({e})") from None
    if isinstance(cfg, AutoencoderConfig) and model.decoder.lm_head_weight is not model.encoder.embed_tokens.weight:
        raise ReleaseError(f"{where}: the decoder's output projection is no longer tied to the embedding")
    return model.to(device).eval()


def _describe_config(path: str | os.PathLike):
    d = Path(path)
    values, sidecar, cfg_path = _read_config(d)
    arch = _detect_architecture(values, cfg_path)
    cfg = model_config_from_release(values, sidecar, cfg_path)
    return d, values, sidecar, cfg_path, arch, cfg


def import_release(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                   dtype: Optional[torch.dtype] = None) -> tuple[nn.Module, Any]:
    """Read a release directory into our model: (model in eval mode, our model config).

    Accepts our exports, the reference pipeline's directories (``pytorch_model.bin``, sharded or not),
    HF Llama checkpoints for the Transformer baseline, and the data pipeline's AE directories. The weights
    keep the file's dtype unless `dtype` is given. A CALM release's embedded autoencoder (``ae_model.*``)
    is read by :func:`import_release_ae`.
    """
    d, values, _, _, arch, cfg = _describe_config(path)
    tensors, source = read_release_tensors(d)
    state, _ = split_release_state(arch, tensors, source, bool(values.get("tie_word_embeddings")))
    return _load_into(cfg, state, source, arch, device, dtype), cfg


def _infer_ae_config(state: Mapping[str, torch.Tensor], calm_cfg: CALMConfig, where: str) -> AutoencoderConfig:
    """The AE config from its tensor shapes (a reference CALM file carries no AE config); the fields
    no shape tells (norm eps, training options) take the published AE's values."""
    try:
        vocab, hidden = state["encoder.embed_tokens.weight"].shape
        inter = state["encoder.encoder_layers.0.mlp.gate_proj.weight"].shape[0]
        latent = state["decoder.latent_to_hidden.weight"].shape[1]
        k = state["encoder.squeeze_layer.weight"].shape[1] // hidden
    except KeyError as e:
        raise ReleaseError(f"{where}: embedded autoencoder lacks {e.args[0]}") from None

    def layers(prefix: str) -> int:
        return len({n[len(prefix):].split(".")[0] for n in state if n.startswith(prefix)})

    ids = {n: getattr(calm_cfg, n) for n in ("pad_token_id", "bos_token_id", "eos_token_id")}
    try:
        return model_config_from_dict({"arch": "autoencoder", "k": k, "latent_dim": latent, "vocab_size": vocab,
                                       "hidden_size": hidden, "intermediate_size": inter,
                                       "num_encoder_layers": layers("encoder.encoder_layers."),
                                       "num_decoder_layers": layers("decoder.decoder_layers."), **ids})
    except ConfigError as e:
        raise ReleaseError(f"{where}: cannot infer the embedded autoencoder's config ({e})") from None


def import_release_ae(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                      dtype: Optional[torch.dtype] = None) -> tuple[nn.Module, AutoencoderConfig]:
    """The autoencoder of a release: an AE release itself, or the ``ae_model.*`` copy inside a CALM release.

    The embedded AE's config comes from our sidecar, else from ``ae_path`` when that is a local release
    directory, else from the tensor shapes."""
    d, values, sidecar, cfg_path, arch, cfg = _describe_config(path)
    if isinstance(cfg, AutoencoderConfig):
        return import_release(d, device=device, dtype=dtype)
    if not isinstance(cfg, CALMConfig):
        raise ReleaseError(f"{cfg_path}: a {arch} release holds no autoencoder")
    tensors, source = read_release_tensors(d)
    _, ae_state = split_release_state(arch, tensors, source)
    if ae_state is None:
        hint = f"; its ae_path is {cfg.ae_path!r}" if cfg.ae_path else ""
        raise ReleaseError(f"{source}: no embedded autoencoder (no {AE_PREFIX}* tensors){hint}")
    if sidecar and sidecar.get("ae_model"):
        try:
            ae_cfg = model_config_from_dict(sidecar["ae_model"])
        except ConfigError as e:
            raise ReleaseError(f"{d / SIDECAR_NAME}: invalid ae_model config ({e})") from None
    elif cfg.ae_path and (Path(cfg.ae_path) / CONFIG_NAME).is_file():
        ae_dir = Path(cfg.ae_path)
        ae_values, ae_sidecar, ae_cfg_path = _read_config(ae_dir)
        ae_cfg = model_config_from_release(ae_values, ae_sidecar, ae_cfg_path)
    else:
        ae_cfg = _infer_ae_config(ae_state, cfg, source)
    if not isinstance(ae_cfg, AutoencoderConfig):
        raise ReleaseError(f"{cfg_path}: the autoencoder config it points to describes a {ae_cfg.arch} model")
    return _load_into(ae_cfg, ae_state, f"{source} ({AE_PREFIX}*)", ARCH_AE, device, dtype), ae_cfg


def release_info(path: str | os.PathLike) -> dict:
    """What a release holds, without loading its weights (safetensors headers only): architecture,
    config.json, our config, weight files, unique parameter counts, and whether names and shapes match."""
    from calm_pretrain.models import count_config_parameters

    d, values, sidecar, cfg_path, arch, cfg = _describe_config(path)
    fmt, files = weight_files(d)
    tensors, source = read_release_tensors(d, header_only=True)
    info: dict[str, Any] = {
        "path": str(d), "architecture": arch if arch != "native" else f"{ARCH_AE} (calm_pretrain AE directory)",
        "config": values, "model_config": dataclasses.asdict(cfg),
        "weights": {"format": fmt, "files": [f.name for f in files], "tensors": len(tensors),
                    "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
                    "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})},
        "parameters": dict(count_config_parameters(cfg)),
        "embedded_ae_parameters": None,
        "tokenizer": sorted(p.name for p in d.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))),
    }
    try:
        state, ae_state = split_release_state(arch, tensors, source, bool(values.get("tie_word_embeddings")))
        check_tensors(state, expected_shapes(cfg), source, arch)
        if ae_state is not None:  # both tied names are present after the split; the pair counts once
            info["embedded_ae_parameters"] = sum(t.numel() for k, t in ae_state.items() if k != AE_TIED[1])
        info["consistent"] = True
    except ReleaseError as e:
        info["consistent"] = False
        info["problem"] = str(e)
    return info
