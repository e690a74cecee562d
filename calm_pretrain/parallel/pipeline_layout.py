"""A model as pipeline layers, without DeepSpeed's engine: the stage-able layers and batch format its
architecture's spec gives, and the mapping between the model's parameter names and a PipelineModule's.
The pipeline engine (parallel/pipeline.py) and the universal conversion of a pipeline checkpoint
(parallel/universal.py: a resume across pipeline layouts, offline consolidation) read these."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from calm_pretrain.models import build_model
from calm_pretrain.models.registry import spec_of


def pipeline_layers(model) -> tuple[list[nn.Module], Optional[Callable]]:
    """The model as a list of stage-able layers (its architecture's spec says how), and DeepSpeed's
    loss_fn (None: the last layer's output is the loss)."""
    spec = spec_of(model.config)
    if spec.pipeline_layers is None:
        raise ValueError(f"parallel.pipeline > 1: the {spec.arch} model has no pipeline stages")
    return spec.pipeline_layers(model)


def pipeline_batch(config, batch: dict):
    """A loader micro-batch in DeepSpeed's pipeline format: (first-stage inputs, last-stage labels)."""
    return spec_of(config).pipeline_batch(config, batch)


def pipeline_parameter_names(model_config) -> dict[str, str]:
    """{model parameter name: its name in the PipelineModule} (``transformer.layers.0.mlp.up_proj.weight``
    -> ``1.layer.mlp.up_proj.weight``), from the layer list built on the meta device: each wrapper's
    parameter is matched to the model's by identity, so the mapping needs no bookkeeping."""
    with torch.device("meta"):
        model = build_model(model_config)
    names = {id(p): name for name, p in model.named_parameters()}
    layers, _ = pipeline_layers(model)
    return {names[id(p)]: f"{idx}.{wrapper_name}" for idx, layer in enumerate(layers)
            for wrapper_name, p in layer.named_parameters()}
