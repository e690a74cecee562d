"""Model definitions (no parallelism here) and the one place that maps a config to a model."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from calm_pretrain.config import AutoencoderConfig, CALMConfig, TransformerConfig
from calm_pretrain.models.autoencoder import Autoencoder
from calm_pretrain.models.calm import CALM
from calm_pretrain.models.transformer import TransformerLM


def build_model(cfg) -> nn.Module:
    if isinstance(cfg, AutoencoderConfig):
        return Autoencoder(cfg)
    if isinstance(cfg, CALMConfig):
        return CALM(cfg)
    if isinstance(cfg, TransformerConfig):
        return TransformerLM(cfg)
    raise TypeError(f"no model for config type {type(cfg).__name__}")


# Components as the spec counts them: top-level module prefixes → report name.
_COMPONENTS = {
    "autoencoder": [("encoder.embed_tokens.", "token embedding (tied)"), ("encoder.", "encoder"),
                    ("decoder.", "decoder")],
    "calm": [("transformer.embed_tokens.", "input embedding"), ("transformer.", "backbone layers"),
             ("embed_proj.", "input compression"), ("mlp_generator.", "head")],
    "transformer": [("transformer.embed_tokens.", "input embedding"), ("transformer.", "backbone layers"),
                    ("lm_head.", "output embedding")],
}


def count_parameters(model: nn.Module) -> "OrderedDict[str, int]":
    """Unique parameters by component (a tied parameter counts once), plus 'total'."""
    arch = model.config.arch
    counts: "OrderedDict[str, int]" = OrderedDict((name, 0) for _, name in _COMPONENTS[arch])
    for pname, p in model.named_parameters():  # named_parameters() skips tied duplicates
        for prefix, comp in _COMPONENTS[arch]:
            if pname.startswith(prefix):
                counts[comp] += p.numel()
                break
        else:
            raise KeyError(f"parameter {pname} belongs to no component of {arch}")
    counts["total"] = sum(counts.values())
    return counts


def count_config_parameters(cfg) -> "OrderedDict[str, int]":
    """Parameter counts of a config without allocating weights (meta device)."""
    with torch.device("meta"):
        model = build_model(cfg)
    return count_parameters(model)


__all__ = ["Autoencoder", "CALM", "TransformerLM", "build_model", "count_parameters", "count_config_parameters"]
