"""Export: our models / consolidated state dicts → a release directory."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from calm_pretrain.release.adapters import adapter_of, generation_config, release_config
from calm_pretrain.release.directory import atomic_directory, check_replacement, clean_stale_temporaries
from calm_pretrain.release.fingerprint import FINGERPRINT_KEY, make_record
from calm_pretrain.models.release_layout import (CONFIG_NAME, GENERATION_CONFIG, SAFE_INDEX, SAFE_WEIGHTS, SIDECAR_NAME,
                                          SIDECAR_VERSION, ReleaseError, dtype_of)
from calm_pretrain.release.names import check_tensors, expected_shapes, release_state


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
                      ae_config=None, dtype: Optional[torch.dtype] = None,
                      max_shard_bytes: Optional[int] = None, source: Optional[dict] = None,
                      overwrite: bool = False, eval_result: Optional[dict] = None) -> Path:
    """Write a release of a consolidated state dict {our parameter name: tensor} with our model config.

    For a CALM model, ``ae_state_dict`` + ``ae_config`` embed the frozen autoencoder under ``ae_model.*``
    (as the reference pipeline does). ``dtype`` casts floating tensors (default: keep; the published
    checkpoints are fp32). ``max_shard_bytes`` splits the weights into several safetensors files with an
    index. ``source`` (what was exported: checkpoint, step, run and data fingerprints) is recorded in the
    sidecar. The directory appears complete or not at all, with a fingerprint of its config and weights.
    An existing release there is replaced only if it is of the same model, and then only with
    ``overwrite`` unless it came from the very same checkpoint (``directory.check_replacement``).
    """
    from calm_pretrain.models import spec_of

    cfg = model_config
    adapter = adapter_of(cfg)
    arch = adapter.published_name(cfg)
    out_dir = Path(out_dir)
    where = f"export to {out_dir}"
    state = dict(state_dict)
    adapter.complete_state(state, where)
    check_tensors(state, expected_shapes(cfg), f"{where}: state dict vs the {arch} config")
    ae_state = None
    if ae_state_dict is not None or ae_config is not None:
        if not spec_of(cfg).uses_autoencoder:
            raise ReleaseError(f"{where}: an embedded autoencoder only belongs in a CALM release, not {arch}")
        if ae_state_dict is None or not _is_autoencoder_config(ae_config):
            raise ReleaseError(f"{where}: embedding the autoencoder needs both its state dict and its config")
        if (ae_config.k, ae_config.latent_dim) != (cfg.k, cfg.latent_dim):
            raise ReleaseError(f"{where}: the autoencoder has K={ae_config.k}, latent {ae_config.latent_dim} but "
                               f"the CALM model K={cfg.k}, latent {cfg.latent_dim}")
        ae_state = dict(ae_state_dict)
        adapter_of(ae_config).complete_state(ae_state, f"{where} (autoencoder)")
        check_tensors(ae_state, expected_shapes(ae_config), f"{where}: autoencoder state dict vs its config")
    tensors = _separate_tensors(release_state(cfg, state, ae_state), dtype)
    config_values = release_config(cfg, dtype_of(tensors))
    sidecar: dict[str, Any] = {"calm_pretrain_release": SIDECAR_VERSION, "architecture": arch,
                               "model": dataclasses.asdict(cfg)}
    if ae_state is not None:
        sidecar["ae_model"] = dataclasses.asdict(ae_config)
    if source is not None:
        sidecar["source"] = source
    clean_stale_temporaries(out_dir)  # first: it may put back a release that a killed export had set aside
    check_replacement(out_dir, arch, config_values, sidecar["model"], source, overwrite)
    with atomic_directory(out_dir) as tmp:
        _write_json(tmp / CONFIG_NAME, config_values)
        generation = generation_config(cfg)
        if generation is not None:
            _write_json(tmp / GENERATION_CONFIG, generation)
        if tokenizer is not None:
            save_tokenizer_files(tokenizer, tmp)
        weights = _write_safetensors(tmp, tensors, max_shard_bytes)
        (tmp / "README.md").write_text(_card(cfg, source, ae_state, ae_config, eval_result))
        # Written last: the fingerprint covers config.json, the rest of this file and every weight file.
        sidecar[FINGERPRINT_KEY] = make_record(tmp, config_values, sidecar, weights)
        _write_json(tmp / SIDECAR_NAME, sidecar)
    return out_dir


def _is_autoencoder_config(cfg) -> bool:
    """A config of a registered architecture that encodes latents (an autoencoder for a CALM to embed)."""
    from calm_pretrain.models import architectures

    spec = architectures().get(getattr(cfg, "arch", None))
    return spec is not None and spec.encodes_latents and isinstance(cfg, spec.config)


def _card(cfg, source, ae_state, ae_config, eval_result) -> str:
    from calm_pretrain.models import count_config_parameters
    from calm_pretrain.release.model_card import model_card

    ae_fp = (source or {}).get("embedded_ae_fingerprint") or ((source or {}).get("data") or {}).get("ae_fingerprint")
    if ae_fp is None and ae_state is not None:
        from data_pipeline.ae_io import autoencoder_fingerprint
        from calm_pretrain.models import build_model

        ae = build_model(ae_config)
        ae.load_state_dict(ae_state, strict=False)
        ae_fp = autoencoder_fingerprint(ae)
    return model_card(cfg, count_config_parameters(cfg), source, ae_fp, eval_result)


def export_release(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, *,
                   ae_model: Optional[nn.Module] = None, dtype: Optional[torch.dtype] = None,
                   max_shard_bytes: Optional[int] = None, overwrite: bool = False) -> Path:
    """Write `model` (our Autoencoder, CALM or TransformerLM) as a release directory.

    The autoencoder is its own release (``export_release(ae, dir)``); ``ae_model`` additionally embeds
    a copy of it in a CALM release under ``ae_model.*``, as the reference pipeline writes it.
    """
    ae_state = ae_cfg = None
    if ae_model is not None:
        ae_state, ae_cfg = ae_model.state_dict(), ae_model.config
    return export_state_dict(model.state_dict(), model.config, out_dir, tokenizer, ae_state_dict=ae_state,
                             ae_config=ae_cfg, dtype=dtype, max_shard_bytes=max_shard_bytes,
                             overwrite=overwrite)

