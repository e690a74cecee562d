"""Model definitions, one package per architecture (autoencoder/, calm/, transformer/), the shared
parts (layers, the decoder backbone and its pipeline stages) and the registry that maps a config to its
architecture's spec. Nothing here knows of parallelism, training loops or workflows: the packages import
only each other, the numerics (losses, brier, eval.scores, flops), the config schema and, for their
release adapters, the leaf module calm_pretrain/models/release_layout.py.
"""
from calm_pretrain.models.registry import (architectures, build_model, count_config_parameters, count_parameters,
                                           spec_of)
from calm_pretrain.models.spec import ModelSpec

__all__ = ["ModelSpec", "architectures", "build_model", "count_parameters", "count_config_parameters", "spec_of"]
