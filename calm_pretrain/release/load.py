"""Import: a release directory → our model and config; release-info."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from calm_pretrain.config import ConfigError, model_config_from_dict
from calm_pretrain.release.adapters import detect, model_config_from_release, release_adapters
from calm_pretrain.release.files import read_config, read_release_tensors, weight_files
from calm_pretrain.models.release_layout import CONFIG_NAME, DTYPE_NAMES, SIDECAR_NAME, ReleaseError, dtype_of
from calm_pretrain.release.fingerprint import describe_mismatch
from calm_pretrain.release.names import check_tensors, expected_shapes, split_release_state
from calm_pretrain.release.verify import verified_load, verify_release


def _target_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    dt = dtype_of(state)
    return dt if dt in DTYPE_NAMES else torch.float32


def _spec(cfg):
    from calm_pretrain.models import spec_of

    return spec_of(cfg)


def _load_into(cfg, state: dict, where: str, adapter, device, dtype) -> nn.Module:
    """`adapter`: the release layout of the names in `where` (errors name tensors as the file does)."""
    from calm_pretrain.models import build_model

    model = build_model(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_tensors(state, expected, where, adapter)
    model.to(dtype or _target_dtype(state))  # in place: the AE's tied Parameter stays one object
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # names and shapes were checked; this is e.g. a dtype torch cannot cast
        raise ReleaseError(f"{where}: cannot load weights ({e})") from None
    if _spec(cfg).release is not None:  # (a plug-in architecture's native directory may have no adapter)
        _spec(cfg).release.check_loaded(model, where)
    return model.to(device).eval()


def _describe_config(path: str | os.PathLike):
    d = Path(path)
    values, sidecar, cfg_path = read_config(d)
    kind = detect(values, cfg_path)
    cfg = model_config_from_release(values, sidecar, cfg_path)
    return d, values, sidecar, cfg_path, kind, cfg


def import_release(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                   dtype: Optional[torch.dtype] = None) -> tuple[nn.Module, Any]:
    """Read a release directory into our model: (model in eval mode, our model config).

    Accepts our exports, the reference pipeline's directories (``pytorch_model.bin``, sharded or not),
    HF Llama checkpoints for the Transformer baseline, and the data pipeline's AE directories. The weights
    keep the file's dtype unless `dtype` is given. A CALM release's embedded autoencoder (``ae_model.*``)
    is read by :func:`import_release_ae`.
    """
    d, values, sidecar, _, kind, cfg = _describe_config(path)

    def load():
        tensors, source = read_release_tensors(d)
        state, _ = split_release_state(kind, tensors, source, bool(values.get("tie_word_embeddings")))
        return _load_into(cfg, state, source, kind.adapter, device, dtype)
    return verified_load(d, values, sidecar, kind, load), cfg


def _infer_ae_config(kind, state: Mapping[str, torch.Tensor], calm_cfg, where: str):
    """The embedded AE's config from its tensor shapes (a reference CALM file carries no AE config); the
    fields no shape tells (norm eps, training options) take the published AE's values."""
    try:
        return model_config_from_dict(kind.adapter.embedded_ae_config(state, calm_cfg, where))
    except ConfigError as e:
        raise ReleaseError(f"{where}: cannot infer the embedded autoencoder's config ({e})") from None


def import_release_ae(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                      dtype: Optional[torch.dtype] = None) -> tuple[nn.Module, Any]:
    """The autoencoder of a release: an AE release itself, or the ``ae_model.*`` copy inside a CALM release.

    The embedded AE's config comes from our sidecar, else from ``ae_path`` when that is a local release
    directory, else from the tensor shapes."""
    d, values, sidecar, cfg_path, kind, cfg = _describe_config(path)
    if _spec(cfg).encodes_latents:
        return import_release(d, device=device, dtype=dtype)
    if not _spec(cfg).uses_autoencoder:
        raise ReleaseError(f"{cfg_path}: a {kind.name} release holds no autoencoder")
    tensors, source = verified_load(d, values, sidecar, kind, lambda: read_release_tensors(d))
    _, ae_state = split_release_state(kind, tensors, source)
    prefix = kind.adapter.embedded_ae_prefix
    if ae_state is None:
        hint = f"; its ae_path is {cfg.ae_path!r}" if cfg.ae_path else ""
        raise ReleaseError(f"{source}: no embedded autoencoder (no {prefix}* tensors){hint}")
    if sidecar and sidecar.get("ae_model"):
        try:
            ae_cfg = model_config_from_dict(sidecar["ae_model"])
        except ConfigError as e:
            raise ReleaseError(f"{d / SIDECAR_NAME}: invalid ae_model config ({e})") from None
    elif cfg.ae_path and (Path(cfg.ae_path) / CONFIG_NAME).is_file():
        ae_dir = Path(cfg.ae_path)
        ae_values, ae_sidecar, ae_cfg_path = read_config(ae_dir)
        ae_cfg = model_config_from_release(ae_values, ae_sidecar, ae_cfg_path)
    else:
        ae_cfg = _infer_ae_config(kind, ae_state, cfg, source)
    if not _spec(ae_cfg).encodes_latents:
        raise ReleaseError(f"{cfg_path}: the autoencoder config it points to describes a {ae_cfg.arch} model")
    return _load_into(ae_cfg, ae_state, f"{source} ({prefix}*)", kind.adapter.autoencoder, device, dtype), ae_cfg


def release_info(path: str | os.PathLike, ae_dir: Optional[str] = None) -> dict:
    """What a release holds, without loading its weights (safetensors headers only): architecture,
    config.json, our config, weight files, unique parameter counts, whether names and shapes match,
    whether config.json and the weights are the ones exported (fingerprint; the weight files are hashed),
    and for a CALM where its autoencoder comes from (`ae_dir`: --ae; see :func:`autoencoder_info`)."""
    from calm_pretrain.models import count_config_parameters

    d, values, sidecar, cfg_path, kind, cfg = _describe_config(path)
    fmt, files = weight_files(d)
    tensors, source = read_release_tensors(d, header_only=True)
    info: dict[str, Any] = {
        "path": str(d), "architecture": kind.name,
        "config": values, "model_config": dataclasses.asdict(cfg),
        "weights": {"format": fmt, "files": [f.name for f in files], "tensors": len(tensors),
                    "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
                    "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})},
        "parameters": dict(count_config_parameters(cfg)),
        "embedded_ae_parameters": None,
        "tokenizer": sorted(p.name for p in d.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))),
    }
    try:
        state, ae_state = split_release_state(kind, tensors, source, bool(values.get("tie_word_embeddings")))
        check_tensors(state, expected_shapes(cfg), source, kind.adapter)
        if ae_state is not None:  # a tied pair counts once
            info["embedded_ae_parameters"] = kind.adapter.autoencoder.unique_parameters(ae_state)
        info["shapes_match"] = True
    except ReleaseError as e:
        info["shapes_match"] = False
        info["problem"] = str(e)
    fp = info["fingerprint"] = verify_release(d, values, sidecar, kind, warn=False)
    if fp["status"] == "mismatch":
        fp["message"] = describe_mismatch(d, fp["problems"])
    info["source"] = (sidecar or {}).get("source")
    info["consistent"] = info["shapes_match"] and fp["status"] != "mismatch"
    if _spec(cfg).uses_autoencoder:
        info["autoencoder"] = autoencoder_info(d, ae_dir)
    elif ae_dir:
        raise ReleaseError(f"{cfg_path}: --ae applies to CALM releases; this is a {kind.name} release")
    return info


def recorded_ae_fingerprint(path: str | os.PathLike) -> Optional[str]:
    """The fingerprint of the autoencoder a CALM release was trained with, as recorded at export (its
    embedded copy's, else the training latents' manifest's); None when the release records none (the
    published layout: see :func:`has_embedded_ae` for a copy whose fingerprint can be computed)."""
    d, values, sidecar, _, kind, cfg = _describe_config(path)
    if not _spec(cfg).uses_autoencoder:
        raise ReleaseError(f"{d / CONFIG_NAME}: a {kind.name} release has no autoencoder of its own")
    src = (sidecar or {}).get("source") or {}
    return src.get("embedded_ae_fingerprint") or (src.get("data") or {}).get("ae_fingerprint")


def has_embedded_ae(path: str | os.PathLike) -> bool:
    """Whether a release's weights hold an autoencoder copy (ae_model.*); safetensors headers only."""
    prefixes = tuple({a.embedded_ae_prefix for a in release_adapters().values() if a.embedded_ae_prefix})
    tensors, _ = read_release_tensors(Path(path), header_only=True)
    return bool(prefixes) and any(name.startswith(prefixes) for name in tensors)


def autoencoder_info(path: str | os.PathLike, ae_dir: Optional[str] = None) -> dict:
    """Where a CALM release's autoencoder comes from, in the order `eval` and `generate` look: `ae_dir`
    (--ae), an embedded ae_model.* copy, the config's ae_path when it exists on this machine. A given
    `ae_dir` that is no autoencoder, or whose K or latent size does not fit, is a ReleaseError."""
    from calm_pretrain.models import count_config_parameters

    d, values, sidecar, cfg_path, kind, cfg = _describe_config(path)
    if not _spec(cfg).uses_autoencoder:
        raise ReleaseError(f"{cfg_path}: --ae applies to CALM releases; this is a {kind.name} release")
    if ae_dir:
        ae_d, _, _, ae_cfg_path, ae_kind, ae_cfg = _describe_config(ae_dir)
        if not _spec(ae_cfg).encodes_latents:
            raise ReleaseError(f"--ae {ae_dir}: {ae_cfg_path} describes a {ae_kind.name} model, not an autoencoder")
        if (ae_cfg.k, ae_cfg.latent_dim) != (cfg.k, cfg.latent_dim):
            raise ReleaseError(f"--ae {ae_dir}: the autoencoder has K={ae_cfg.k}, latent {ae_cfg.latent_dim}; "
                               f"the CALM {d} needs K={cfg.k}, latent {cfg.latent_dim}")
        found = {"source": "--ae", "path": str(ae_d), "k": ae_cfg.k, "latent_dim": ae_cfg.latent_dim,
                 "parameters": count_config_parameters(ae_cfg)["total"]}
    elif has_embedded_ae(d):
        found = {"source": "embedded", "path": str(d), "k": cfg.k, "latent_dim": cfg.latent_dim}
    elif cfg.ae_path and (Path(cfg.ae_path) / CONFIG_NAME).is_file():
        return autoencoder_info(path, cfg.ae_path) | {"source": "ae_path"}
    else:
        where = f"its ae_path {cfg.ae_path!r} does not exist here" if cfg.ae_path else "it names no ae_path"
        return {"source": None, "problem": f"not embedded and {where}: pass --ae DIR"}
    recorded = ((sidecar or {}).get("source") or {}).get("embedded_ae_fingerprint")
    return found | {"recorded_fingerprint": recorded}
