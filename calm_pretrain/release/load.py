"""Import: a release directory → our model and config; release-info."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from calm_pretrain.config import ConfigError, model_config_from_dict
from calm_pretrain.models.autoencoder import AutoencoderConfig
from calm_pretrain.models.calm import CALMConfig
from calm_pretrain.release.files import _read_config, read_release_tensors, weight_files
from calm_pretrain.release.layout import (AE_PREFIX, AE_TIED, ARCH_AE, CONFIG_NAME, SIDECAR_NAME, ReleaseError,
                                          _DTYPE_NAMES, _detect_architecture, _dtype_of, model_config_from_release)
from calm_pretrain.release.fingerprint import describe_mismatch
from calm_pretrain.release.names import check_tensors, expected_shapes, split_release_state
from calm_pretrain.release.verify import verified_load, verify_release


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
    d, values, sidecar, _, arch, cfg = _describe_config(path)

    def load():
        tensors, source = read_release_tensors(d)
        state, _ = split_release_state(arch, tensors, source, bool(values.get("tie_word_embeddings")))
        return _load_into(cfg, state, source, arch, device, dtype)
    return verified_load(d, values, sidecar, arch, load), cfg


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
    tensors, source = verified_load(d, values, sidecar, arch, lambda: read_release_tensors(d))
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


def release_info(path: str | os.PathLike, ae_dir: Optional[str] = None) -> dict:
    """What a release holds, without loading its weights (safetensors headers only): architecture,
    config.json, our config, weight files, unique parameter counts, whether names and shapes match,
    whether config.json and the weights are the ones exported (fingerprint; the weight files are hashed),
    and for a CALM where its autoencoder comes from (`ae_dir`: --ae; see :func:`autoencoder_info`)."""
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
        info["shapes_match"] = True
    except ReleaseError as e:
        info["shapes_match"] = False
        info["problem"] = str(e)
    fp = info["fingerprint"] = verify_release(d, values, sidecar, arch, warn=False)
    if fp["status"] == "mismatch":
        fp["message"] = describe_mismatch(d, fp["problems"])
    info["source"] = (sidecar or {}).get("source")
    info["consistent"] = info["shapes_match"] and fp["status"] != "mismatch"
    if isinstance(cfg, CALMConfig):
        info["autoencoder"] = autoencoder_info(d, ae_dir)
    elif ae_dir:
        raise ReleaseError(f"{cfg_path}: --ae applies to CALM releases; this is a {arch} release")
    return info


def recorded_ae_fingerprint(path: str | os.PathLike) -> Optional[str]:
    """The fingerprint of the autoencoder a CALM release was trained with, as recorded at export (its
    embedded copy's, else the training latents' manifest's); None when the release records none (the
    published layout: see :func:`has_embedded_ae` for a copy whose fingerprint can be computed)."""
    d, values, sidecar, _, arch, cfg = _describe_config(path)
    if not isinstance(cfg, CALMConfig):
        raise ReleaseError(f"{d / CONFIG_NAME}: a {arch} release has no autoencoder of its own")
    src = (sidecar or {}).get("source") or {}
    return src.get("embedded_ae_fingerprint") or (src.get("data") or {}).get("ae_fingerprint")


def has_embedded_ae(path: str | os.PathLike) -> bool:
    """Whether a release's weights hold an autoencoder copy (ae_model.*); safetensors headers only."""
    tensors, _ = read_release_tensors(Path(path), header_only=True)
    return any(name.startswith(AE_PREFIX) for name in tensors)


def autoencoder_info(path: str | os.PathLike, ae_dir: Optional[str] = None) -> dict:
    """Where a CALM release's autoencoder comes from, in the order `eval` and `generate` look: `ae_dir`
    (--ae), an embedded ae_model.* copy, the config's ae_path when it exists on this machine. A given
    `ae_dir` that is no autoencoder, or whose K or latent size does not fit, is a ReleaseError."""
    from calm_pretrain.models import count_config_parameters

    d, values, sidecar, cfg_path, arch, cfg = _describe_config(path)
    if not isinstance(cfg, CALMConfig):
        raise ReleaseError(f"{cfg_path}: --ae applies to CALM releases; this is a {arch} release")
    if ae_dir:
        ae_d, _, _, ae_cfg_path, ae_arch, ae_cfg = _describe_config(ae_dir)
        if not isinstance(ae_cfg, AutoencoderConfig):
            raise ReleaseError(f"--ae {ae_dir}: {ae_cfg_path} describes a {ae_arch} model, not an autoencoder")
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
