"""Finding an architecture's release adapter, and the generic part of the config.json mapping.

Each architecture's adapter (``spec_of(cfg).release``, in ``calm_pretrain/models/<arch>/release.py``)
knows its published name(s), its config.json keys and its parameter names; this module finds it from a
config (``adapter_of``) or from a config.json (``detect``: its ``architectures`` entry, else its
``model_type``), and adds what every release's config.json has (architectures, dtype, version)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from calm_pretrain.models.release_layout import (HF_BOOKKEEPING, SIDECAR_NAME, TRANSFORMERS_VERSION, ReleaseAdapter,
                                          ReleaseError, dtype_name)


@dataclass(frozen=True)
class Published:
    """What a config.json says it is: a published architecture `name` and its adapter; `native`: our own
    AE directory format (calm_pretrain.release.autoencoder: config.json is our dataclass), read by the adapter of its
    `arch` (the base adapter, our names as they are, when that names no architecture with one)."""
    name: str
    adapter: ReleaseAdapter
    native: bool = False

    def known_config_keys(self) -> Optional[set[str]]:
        """The config.json keys a loader of ours reads; None: our native directories (checked field by field)."""
        return None if self.native else set(HF_BOOKKEEPING) | self.adapter.known_config_keys(self.name)


def release_adapters() -> dict[str, ReleaseAdapter]:
    """{published architecture name: adapter} of every registered architecture that has one."""
    from calm_pretrain.models import architectures

    return {name: spec.release for spec in architectures().values() if spec.release
            for name in spec.release.published_names}


def adapter_of(cfg) -> ReleaseAdapter:
    from calm_pretrain.models import architectures

    spec = architectures().get(getattr(cfg, "arch", None))
    if spec is None or spec.release is None:
        raise ReleaseError(f"no release architecture for config type {type(cfg).__name__}")
    return spec.release


def architecture_of(cfg) -> str:
    """The published architecture name of a release of `cfg`."""
    return adapter_of(cfg).published_name(cfg)


def release_config(cfg, dtype: torch.dtype = torch.float32) -> dict:
    """The ``config.json`` dict of a release of a model with config `cfg` and weights of `dtype`."""
    adapter = adapter_of(cfg)
    out: dict[str, Any] = {"architectures": [adapter.published_name(cfg)], **adapter.release_config(cfg)}
    out["torch_dtype"] = dtype_name(dtype)
    out["transformers_version"] = TRANSFORMERS_VERSION
    return dict(sorted(out.items()))  # HF writes its config keys sorted


def generation_config(cfg) -> Optional[dict]:
    """``generation_config.json`` of a release of `cfg`, or None when its architecture writes none."""
    return adapter_of(cfg).generation_config(cfg)


def detect(values: dict, cfg_path: Path) -> Published:
    """The published architecture a config.json describes."""
    from calm_pretrain.models import architectures

    adapters = release_adapters()
    supported = ", ".join(adapters)
    archs = values.get("architectures")
    if isinstance(archs, list) and archs:
        if isinstance(archs[0], str) and archs[0] in adapters:
            return Published(archs[0], adapters[archs[0]])
        raise ReleaseError(f"{cfg_path}: unknown architecture {archs[0]!r}; supported: {supported}")
    if "arch" in values:  # our own AE directory format (release/autoencoder.py): config.json = the dataclass
        spec = architectures().get(values["arch"]) if isinstance(values["arch"], str) else None
        if spec is None or spec.release is None:  # its config will not load (or not be released): plain names
            return Published(f"{values['arch']} (calm_pretrain AE directory)", ReleaseAdapter(), native=True)
        return Published(f"{spec.release.published_names[0]} (calm_pretrain AE directory)", spec.release, native=True)
    model_type = values.get("model_type")
    for name, adapter in adapters.items():
        if model_type in adapter.model_types:
            return Published(name, adapter)
    raise ReleaseError(f"{cfg_path}: unknown architecture (no 'architectures' entry, model_type={model_type!r}); "
                       f"supported: {supported}")


def model_config_from_release(values: dict, sidecar: Optional[dict], cfg_path: Path, *, key: str = "model"):
    """Our model config from a release ``config.json`` dict (+ the optional sidecar entry `key`)."""
    from calm_pretrain.config import ConfigError, model_config_from_dict

    kind = detect(values, cfg_path)
    base = dict((sidecar or {}).get(key) or {})
    merged = dict(values) if kind.native else kind.adapter.config_dict(values, kind.name, base, cfg_path)
    if base.get("arch") not in (None, merged.get("arch")):
        raise ReleaseError(f"{cfg_path.parent / SIDECAR_NAME}: describes a {base['arch']} model but "
                           f"{cfg_path.name} a {merged['arch']} one")
    try:
        return model_config_from_dict(merged)
    except ConfigError as e:
        source = f"{cfg_path} with {SIDECAR_NAME}" if base else str(cfg_path)
        raise ReleaseError(f"{source}: not a valid configuration ({e})") from None
