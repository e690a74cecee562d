"""The model registry: one spec per architecture, the only place that knows which architectures exist.

A spec says everything the workflows need to treat a model: its config dataclass and module class, the
loss on a loader batch, the data its shards must hold, how it is scored, its FLOPs, how its parameters
group into components, its pipeline stages and its activation-checkpointing blocks, and its release
adapter. Code outside ``calm_pretrain/models/`` asks the spec (``spec_of(cfg)``) instead of testing
types or ``arch`` strings, so an architecture plugs in with one package (whose ``SPEC`` is a
calm_pretrain/models/spec.py ModelSpec) and one line in ARCHITECTURES below.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from collections import OrderedDict

import torch
from torch import nn

from calm_pretrain.flops import FlopsBreakdown
from calm_pretrain.models import autoencoder, calm, transformer
from calm_pretrain.models.spec import ModelSpec
from calm_pretrain.schema import ConfigError

ARCHITECTURES: dict[str, ModelSpec] = {spec.arch: spec for spec in (
    autoencoder.SPEC,
    calm.SPEC,
    transformer.SPEC,
)}

# Architectures outside this repository: modules (comma-separated) whose SPEC is registered on import,
# in every process of a run (the launchers pass the environment on), e.g. a test's toy architecture.
PLUGINS_ENV = "CALM_PRETRAIN_ARCHITECTURES"


def _register_plugins() -> None:
    for name in filter(None, (n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            spec = importlib.import_module(name).SPEC
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"{PLUGINS_ENV}: cannot register {name!r}: {e}") from None
        if spec.arch in ARCHITECTURES and ARCHITECTURES[spec.arch] is not spec:
            raise ConfigError(f"{PLUGINS_ENV}: {name} registers {spec.arch!r}, which is taken")
        ARCHITECTURES[spec.arch] = spec


_register_plugins()


def architectures() -> dict[str, ModelSpec]:
    """{arch: spec} of every registered architecture."""
    return ARCHITECTURES


def spec_of(cfg_or_arch, key: str = "model") -> ModelSpec:
    """The spec of a model config (or of an `arch` name); `key` names the config section in errors."""
    arch = cfg_or_arch if isinstance(cfg_or_arch, str) else cfg_or_arch.arch
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{key}.arch: unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


@contextlib.contextmanager
def registered(spec: ModelSpec):
    """Register `spec` for the duration of a block (a plug-in architecture, or a test's toy one)."""
    if spec.arch in ARCHITECTURES:
        raise ValueError(f"architecture {spec.arch!r} is registered already")
    ARCHITECTURES[spec.arch] = spec
    try:
        yield spec
    finally:
        del ARCHITECTURES[spec.arch]


def build_model(cfg) -> nn.Module:
    return spec_of(cfg).model(cfg)


def count_parameters(model: nn.Module) -> "OrderedDict[str, int]":
    """Unique parameters by component (a tied parameter counts once), plus 'total'."""
    spec = spec_of(model.config)
    counts: "OrderedDict[str, int]" = OrderedDict((name, 0) for _, name in spec.components)
    for pname, p in model.named_parameters():  # named_parameters() skips tied duplicates
        for prefix, comp in spec.components:
            if pname.startswith(prefix):
                counts[comp] += p.numel()
                break
        else:
            raise KeyError(f"parameter {pname} belongs to no component of {spec.arch}")
    counts["total"] = sum(counts.values())
    return counts


def count_config_parameters(cfg) -> "OrderedDict[str, int]":
    """Parameter counts of a config without allocating weights (meta device)."""
    with torch.device("meta"):
        model = build_model(cfg)
    return count_parameters(model)


def training_flops_per_token(cfg, context: int, ae=None) -> FlopsBreakdown:
    """Training FLOPs per token (forward + backward) of a model config at a given context (positions);
    `ae`: the frozen autoencoder's config, for a model that uses one."""
    return FlopsBreakdown(spec_of(cfg).training_flops(cfg, context, ae))


def inference_flops_per_token(cfg, context: int, ae=None) -> FlopsBreakdown:
    """Generation FLOPs per token at a given context (CALM: one head sample per vector, T = 1)."""
    spec = spec_of(cfg)
    if spec.inference_flops is None:
        raise TypeError(f"no inference FLOPs model for {spec.arch}: it does not generate")
    return FlopsBreakdown(spec.inference_flops(cfg, context, ae))
