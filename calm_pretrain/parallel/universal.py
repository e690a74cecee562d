"""DeepSpeed's universal checkpoint format: the one way a DeepSpeed checkpoint is read outside its own
layout.

``to_universal`` runs DeepSpeed's ``ds_to_universal`` (in this process: one extract and one merge
worker) on a checkpoint's ``engine/`` directory. The result holds, under ``zero/<name>/``, every
parameter's full fp32 weight (``fp32.pt``) and Adam moments: ZeRO 1/2/3 partitions joined, tensor-parallel
slices merged by the rules the checkpoint carries (``tensor.universal_checkpoint_info``). Parameter names
follow the engine that wrote it (a pipeline's are ``<layer index>.<name in the layer>``), so a conversion
between a pipeline and no pipeline renames them. Two callers:

* a resume at another layout (``engine.load_deepspeed_checkpoint``): rank 0 converts once, beside the
  checkpoint, and every rank of the new layout slices the result again;
* offline consolidation (``deepspeed_state_dict``, for ``train/checkpoint.consolidated_state_dict``):
  the conversion goes to a temporary directory, deleted afterwards, and ``fp32.pt`` of every parameter
  becomes the state dict.

Every ``torch.load`` on the way (DeepSpeed's included) is the checkpoint allow-list's
(``calm_pretrain/safe_load.py``): no file is unpickled with arbitrary globals.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from calm_pretrain.models import build_model
from calm_pretrain.parallel.pipeline_layout import pipeline_parameter_names
from calm_pretrain.safe_load import deepspeed_loads_safely, safe_load


def to_universal(engine_dir: Path, out: Path, model_config, from_pipeline: bool, to_pipeline: bool) -> Path:
    """DeepSpeed checkpoint `engine_dir` converted to the universal format at `out` (not existing yet),
    its parameters named as a pipeline's (`to_pipeline`) or the model's; returns `out`."""
    from deepspeed.checkpoint import ds_to_universal

    with deepspeed_loads_safely():
        ds_to_universal.main(argparse.Namespace(
            input_folder=str(engine_dir), output_folder=str(out), num_extract_workers=1, num_merge_workers=1,
            keep_temp_folder=False, strict=True, inject_missing_state=True))
    if from_pipeline != to_pipeline:
        to_pipe = pipeline_parameter_names(model_config)
        rename = {v: k for k, v in to_pipe.items()} if from_pipeline else to_pipe
        for old, new in rename.items():
            os.rename(out / "zero" / old, out / "zero" / new)
    return out


def universal_state_dict(universal_dir: Path, model_config) -> dict:
    """{model parameter name: full fp32 weight} from a universal checkpoint named as the model's. A tied
    parameter (one Parameter under two names, e.g. the autoencoder's embedding and output weight) is
    stored once, under its first name, and given under each of its names."""
    with torch.device("meta"):
        model = build_model(model_config)
    first: dict[int, str] = {}  # parameter identity -> the name DeepSpeed stores it under
    names = {name: first.setdefault(id(p), name) for name, p in model.named_parameters(remove_duplicate=False)}
    shapes = dict(model.named_parameters())
    zero = Path(universal_dir) / "zero"
    missing = [name for name in shapes if not (zero / name / "fp32.pt").is_file()]
    if missing:
        raise FileNotFoundError(f"{universal_dir}: the universal conversion holds no weight for {missing[:5]}"
                                f"{' ...' if len(missing) > 5 else ''}")
    weights = {name: _fp32_weight(zero / name / "fp32.pt", p.shape) for name, p in shapes.items()}
    return {name: weights[stored] for name, stored in names.items()}


def _fp32_weight(path: Path, shape: torch.Size) -> torch.Tensor:
    """A parameter's fp32.pt: ZeRO 1/2 write {"param": the shaped tensor}, ZeRO-3 the flat tensor itself
    (its partitions joined without padding)."""
    saved = safe_load(path)
    weight = saved["param"] if isinstance(saved, dict) else saved
    if weight.numel() != shape.numel():
        raise ValueError(f"{path}: {weight.numel()} values, the model's parameter has shape {tuple(shape)}")
    return weight.reshape(shape)


def writes_optimizer_partitions(engine_dir: Path) -> bool:
    """Whether a DeepSpeed checkpoint holds the optimizer partition files (`*_optim_states.pt`) that
    ds_to_universal reads. ZeRO stages 1-3 always write them. Stage 0 in fp32 (the optimizer is torch's
    own) and in bf16 without a pipeline (DeepSpeed's DDP-bf16 wrapper) keep the optimizer inside the
    model-states files instead (both seen on CPU); stage 0 in bf16 with a pipeline gets DeepSpeed's
    BF16_Optimizer, which writes them (DeepSpeed's engine code; not run here without a GPU)."""
    return any(Path(engine_dir).glob("*optim_states.pt"))


def deepspeed_state_dict(engine_dir: Path, model_config, pipeline: bool) -> dict:
    """{model parameter name: full fp32 weight} of the DeepSpeed checkpoint `engine_dir` (written with a
    pipeline when `pipeline`), in this process, without a training world."""
    engine_dir = Path(engine_dir)
    if not writes_optimizer_partitions(engine_dir):
        # The one fallback. ZeRO stage 0 without optimizer partition files, which ds_to_universal cannot
        # convert ("can't find *_optim_states.pt files"): its weights are whole in the model-states files.
        return _stage0_state_dict(engine_dir, model_config, pipeline)
    with tempfile.TemporaryDirectory(prefix="calm-consolidate-") as tmp:
        universal = to_universal(engine_dir, Path(tmp) / "universal", model_config, pipeline, False)
        return universal_state_dict(universal, model_config)


def _stage0_state_dict(engine_dir: Path, model_config, pipeline: bool) -> dict:
    """ZeRO stage 0 (no ZeRO partitions, see `deepspeed_state_dict`): the weights each tensor-parallel rank
    holds whole in its model-states files (a pipeline: one file per layer and rank, named by the layer
    list rebuilt on the meta device), its slices merged by the plan's split rules. These are the module's
    weights, the fp32 master itself in fp32; under bf16 the bf16 weights (DeepSpeed's DDP-bf16 wrapper
    keeps its fp32 copy in a flat optimizer layout nothing reads offline)."""
    from calm_pretrain.parallel.tensor import merge_tensor_parallel_shards

    if not pipeline:
        files = sorted(engine_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{engine_dir}: no mp_rank_*_model_states.pt (a DeepSpeed checkpoint's files)")
        per_rank = [safe_load(f)["module"] for f in files]
    else:
        by_layer: dict[int, dict[str, str]] = {}  # layer index -> {name in the layer: model name}
        for name, pipe_name in pipeline_parameter_names(model_config).items():
            idx, wrapper_name = pipe_name.split(".", 1)
            by_layer.setdefault(int(idx), {})[wrapper_name] = name
        per_rank = []
        for idx, layer_names in sorted(by_layer.items()):
            files = sorted(engine_dir.glob(f"layer_{idx:02d}-*model_states.pt"))  # model_00, _01: TP ranks
            if not files:
                raise FileNotFoundError(f"{engine_dir}: no checkpoint file for pipeline layer {idx}")
            per_rank += [{} for _ in range(len(files) - len(per_rank))]
            for rank_state, f in zip(per_rank, files):
                saved = safe_load(f)
                rank_state.update({name: saved[wrapper_name] for wrapper_name, name in layer_names.items()})
    return per_rank[0] if len(per_rank) == 1 else merge_tensor_parallel_shards(per_rank, model_config.vocab_size)
