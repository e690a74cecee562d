"""Pipeline parallelism: the model as a DeepSpeed `PipelineModule`, run with its 1F1B schedule.

Stages are built from the finished model (the same weights as without a pipeline) by its architecture's
spec (calm_pretrain/models/registry.py: CALM's in models/calm/pipeline_stages.py, the Transformer's in
models/pipeline_stages.py): a first stage (embeddings), the decoder blocks (partitioned across stages by
parameter count), and a last stage that ends in the loss or in logits for DeepSpeed's ``loss_fn``.

The engine adapter's ``step`` (the one engine interface, ``calm_pretrain.parallel.engine_api``) is
DeepSpeed's ``train_batch``: DeepSpeed's pipeline engine pulls ``grad_accum_steps`` micro-batches itself
on the first and last stages, runs 1F1B, all-reduces over data-parallel replicas, clips and steps.
Pipeline parallelism goes with ZeRO stage 0 or 1.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from calm_pretrain.config import RunConfig
from calm_pretrain.parallel.engine_api import StepResult
from calm_pretrain.parallel.pipeline_layout import pipeline_batch, pipeline_layers


class PipelineEngine:
    """The engine interface for a pipeline: ``step`` runs a whole accumulation window (1F1B)."""

    kind = "deepspeed"

    def __init__(self, model: nn.Module, cfg: RunConfig, topology, world_size: int):
        import deepspeed
        from deepspeed.pipe import PipelineModule

        from calm_pretrain.parallel.engine import build_optimizer, deepspeed_config
        from calm_pretrain.parallel.groups import ParallelLayout

        self.cfg, self.module = cfg, model
        self.layout = ParallelLayout.of_run(cfg.parallel, world_size)
        layers, loss_fn = pipeline_layers(model)
        self.pipe = PipelineModule(layers=layers, topology=topology, loss_fn=loss_fn,
                                   partition_method="parameters", activation_checkpoint_interval=0)
        # Other stages' layers stay in `model` (for its config and shapes) but on the meta device:
        # a rank holds the weights of its own stage only.
        local = {id(m) for m in self.pipe.forward_funcs}
        for layer in layers:
            if id(layer) not in local:
                # New parameter objects on the meta device: keep the full shapes of tensor-parallel
                # slices, which the model's signature (the same on every rank) reports.
                unsplit = {n: p.unsplit_shape for n, p in layer.named_parameters() if hasattr(p, "unsplit_shape")}
                layer.to("meta")
                for n, p in layer.named_parameters():
                    if n in unsplit:
                        p.unsplit_shape = unsplit[n]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.pipe, optimizer=build_optimizer(self.pipe, cfg),
            config=deepspeed_config(cfg, world_size, torch.cuda.is_available()))
        # The first and last stage of every model-parallel group both read each micro-batch: each
        # reports its share, so a sum over all ranks counts every sample once.
        tp = topology.get_dim("model") if "model" in topology.get_axis_names() else 1
        self.token_share = 1.0 / (2 * tp)

    @property
    def device(self) -> torch.device:
        return next(self.pipe.parameters()).device

    def step(self, batches: Iterator[dict], lr: float, loss_fn=None) -> StepResult:
        """The window: mean loss over it and the DP replicas (a tensor), this rank's token share, grad norm,
        applied. `loss_fn` is not used: the last stage computes the loss (``pipeline_layers``)."""
        tokens = [0]

        def micro_batches():
            while True:
                b = next(batches)
                tokens[0] += b["ids"].numel()
                yield pipeline_batch(self.module.config, {k: v.to(self.device) for k, v in b.items()
                                                           if isinstance(v, torch.Tensor)})

        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.engine.train_batch(data_iter=micro_batches())
        applied = self.engine.was_step_applied()
        norm = self.engine.get_global_grad_norm()
        grad_norm = float(norm) if applied and norm is not None else float("nan")
        return StepResult(loss, int(tokens[0] * self.token_share), grad_norm, applied)

    def save(self, path) -> None:
        from calm_pretrain.parallel.engine import save_deepspeed_checkpoint

        save_deepspeed_checkpoint(self.engine, path, self.module)

    def load(self, path, saved_layout) -> None:
        from calm_pretrain.parallel.engine import load_deepspeed_checkpoint

        load_deepspeed_checkpoint(self.engine, path, saved_layout, self.layout, self.module.config)
