"""A model as pipeline layers, without DeepSpeed's engine: the stage-able layers and batch format its
architecture's spec gives, the mapping between the model's parameter names and a PipelineModule's, and
the full state dict from a pipeline checkpoint's per-layer files. The pipeline engine
(parallel/pipeline.py), a resume across pipeline layouts (parallel/engine.py) and offline consolidation
(train/checkpoint.py) all read these."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from calm_pretrain.models import build_model
from calm_pretrain.models.registry import spec_of
from calm_pretrain.train.safe_load import safe_load


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


def pipeline_state_dict(engine_dir, model_config) -> dict:
    """Our full state dict from a pipeline checkpoint's per-layer files (`layer_XX[-model_YY]-model_states.pt`,
    one per layer and tensor-parallel rank).

    The layer list is rebuilt from the config on the meta device, and each wrapper's parameter is mapped
    back to the model's own name by identity, so the names need no bookkeeping in the checkpoint; the
    tensor-parallel shards of each name are then merged."""
    from pathlib import Path

    from calm_pretrain.parallel.tensor import merge_tensor_parallel_shards

    names = pipeline_parameter_names(model_config)
    by_layer: dict[str, dict[str, str]] = {}  # layer index -> {name in the layer: model name}
    for name, pipe_name in names.items():
        idx, wrapper_name = pipe_name.split(".", 1)
        by_layer.setdefault(idx, {})[wrapper_name] = name
    per_rank: list[dict] = []
    for idx, layer_names in sorted(by_layer.items(), key=lambda kv: int(kv[0])):
        files = sorted(Path(engine_dir).glob(f"layer_{int(idx):02d}-*model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{engine_dir}: no checkpoint file for pipeline layer {idx}")
        per_rank += [{} for _ in range(len(files) - len(per_rank))]
        for rank_state, path in zip(per_rank, files):  # model_00, model_01, ...: tensor-parallel ranks
            saved = safe_load(path)
            for wrapper_name, name in layer_names.items():
                rank_state[name] = saved[wrapper_name]
    state = per_rank[0] if len(per_rank) == 1 else merge_tensor_parallel_shards(per_rank, model_config.vocab_size)
    missing = set(names) - set(state)
    if missing:
        raise KeyError(f"{engine_dir}: the pipeline layers do not cover {sorted(missing)[:5]}")
    return state
