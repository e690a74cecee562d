"""Engines: what owns forward, backward, the optimizer step and the engine's share of a checkpoint.

* :class:`TorchEngine` — one process, plain PyTorch AdamW (the bare baseline and the fallback).
* :class:`DeepSpeedEngine` — DeepSpeed's engine: ZeRO stage 0-3, gradient accumulation, clipping,
  AdamW (apex's fused AdamW when importable), bf16 on GPU (fp32 on CPU), optional CPU offload of
  the optimizer state. Tensor and pipeline parallelism come in through the same class (a megatron-core
  plan applied to the model first, a PipelineModule instead of the model).

Both, and the pipeline's engine, implement :class:`calm_pretrain.parallel.engine_api.Engine`: ``module``,
``device``, ``step(batches, lr, loss_fn) -> StepResult`` (one whole accumulation window: forward,
backward, clip, update; a window whose gradient norm is not finite is dropped without touching weights
or optimizer state, on every rank alike, as the norm is global) and ``save(dir)`` / ``load(dir, saved)``
(model and optimizer state; each rank writes its own partition).
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from calm_pretrain.config import RunConfig
from calm_pretrain.parallel.engine_api import StepResult, accumulate_window
from calm_pretrain.parallel.groups import ParallelLayout


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms and biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    # Under ZeRO-3 a parameter's local tensor is empty; its true shape is ds_shape.
    ndim = [len(getattr(p, "ds_shape", p.shape)) for p in params]
    return [{"params": [p for p, d in zip(params, ndim) if d >= 2], "weight_decay": weight_decay},
            {"params": [p for p, d in zip(params, ndim) if d < 2], "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW: apex's fused kernel when importable and on GPU, torch's fused one on GPU, else torch's."""
    t = cfg.train
    groups = _param_groups(model, t.weight_decay)
    on_gpu = any(p.is_cuda for p in model.parameters())
    if on_gpu:
        try:
            from apex.optimizers import FusedAdam  # type: ignore

            return FusedAdam(groups, lr=t.lr, betas=(t.beta1, t.beta2), adam_w_mode=True)
        except Exception:  # noqa: BLE001 - apex is optional and often half-installed
            pass
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=on_gpu and not t.offload_optimizer)


class TorchEngine:
    kind = "torch"

    def __init__(self, model: nn.Module, cfg: RunConfig):
        self.module, self.cfg = model, cfg
        self.optimizer = build_optimizer(model, cfg)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def step(self, batches, lr: float, loss_fn) -> StepResult:
        """One accumulation window: each micro-batch's loss / n backward, then clip and update (or drop)."""
        n = self.cfg.train.grad_accum_steps
        loss, extras, tokens = accumulate_window(self.module, lambda x: (x / n).backward(), batches, loss_fn, n,
                                                 self.device)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.train.grad_clip).item()
        applied = math.isfinite(grad_norm)
        if applied:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, tokens, grad_norm, applied, extras)

    def save(self, path: Path) -> None:
        from calm_pretrain.parallel.hashed_writes import hashed_save

        path.mkdir(parents=True, exist_ok=True)
        hashed_save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}, path / "engine.pt")

    def load(self, path: Path, saved_layout: ParallelLayout) -> None:
        if not (path / "engine.pt").is_file():
            raise FileNotFoundError(f"{path}: no engine.pt; this checkpoint was written by DeepSpeed ({saved_layout}): "
                                    "resume it under torchrun or with train.engine=deepspeed")
        from calm_pretrain.safe_load import safe_load

        state = safe_load(path / "engine.pt")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def deepspeed_config(cfg: RunConfig, world_size: int, on_gpu: bool) -> dict:
    """The DeepSpeed JSON for a run: every value comes from the RunConfig."""
    t = cfg.train
    bf16 = t.precision == "bf16" or (t.precision == "auto" and on_gpu)
    # Checkpoints keep DeepSpeed's default (rigid) layout: the universal converter, which a resume at
    # another data-parallel size goes through, reads that layout only.
    zero = {"stage": t.zero_stage, "reduce_bucket_size": t.zero_bucket_elements,
            "allgather_bucket_size": t.zero_bucket_elements}
    if t.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=t.zero_bucket_elements,
                    stage3_max_live_parameters=t.zero3_max_live_parameters)
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    dp = ParallelLayout.of_run(cfg.parallel, world_size).data
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * dp,
        "gradient_clipping": t.grad_clip,
        # A non-finite gradient norm drops the step instead of writing NaNs into the weights.
        "bf16": {"enabled": bf16, "check_grad_overflow": True} if bf16 else {"enabled": False},
        "zero_optimization": zero,
        # DeepSpeed's own CPU Adam is a C++ op compiled on first use; torch's AdamW needs no build.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_model_sharded(cfg: RunConfig, build: Callable[[], nn.Module], world_size: int) -> nn.Module:
    """Build the model so that under ZeRO-3 no rank ever holds all of it.

    Under ZeRO-3 the modules are constructed inside ``deepspeed.zero.Init`` (each parameter is split
    across ranks as soon as its module exists), then initialised module by module, each leaf's
    parameters gathered only while it is initialised: the same values, in the same RNG order, as an
    unsharded build.
    """
    if cfg.train.zero_stage != 3:
        return build()
    import deepspeed

    ds_config = deepspeed_config(cfg, world_size, torch.cuda.is_available())
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = build()
    model.reset_parameters(param_context=gathered_for_writing)
    return model


def gathered_for_writing(params):
    """A context in which the ZeRO-3 partitioned ones of `params` are whole, and what rank 0 writes
    into them is partitioned again on exit; ordinary parameters need nothing."""
    sharded = [p for p in params if hasattr(p, "ds_id")]
    if not sharded:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(sharded, modifier_rank=0)


class DeepSpeedEngine:
    kind = "deepspeed"

    def __init__(self, model: nn.Module, cfg: RunConfig, world_size: Optional[int] = None, mpu=None):
        """`mpu`: the model-parallel groups (``groups.DeepSpeedMPU()`` under tensor parallelism): DeepSpeed
        then reduces gradients over the data-parallel group only, broadcasts initial weights within it,
        and sums gradient norms over the model-parallel group."""
        import deepspeed

        self.cfg = cfg
        world_size = world_size or (torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)
        self.layout = ParallelLayout.of_run(cfg.parallel, world_size)
        self.ds_config = deepspeed_config(cfg, world_size, torch.cuda.is_available())
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=build_optimizer(model, cfg), config=self.ds_config, mpu=mpu)
        self.module = self.engine.module
        # The ranks of a tensor-parallel group read the same micro-batch: each counts its share of it.
        self.token_share = 1.0 / (mpu.get_tensor_model_parallel_world_size() if mpu is not None else 1)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def step(self, batches, lr: float, loss_fn) -> StepResult:
        """One accumulation window, in DeepSpeed's own accumulation API: every micro-batch goes forward
        through DeepSpeed's engine (ZeRO-3's hooks count micro-steps there: the bare module would keep only
        the last micro-batch's gradient), then ``engine.backward(loss)`` (DeepSpeed divides by the
        accumulation steps itself) and ``engine.step()``, which inside the window only advances its
        micro-step counter. At the boundary (the last micro-batch) ZeRO reduces the gradients, and
        ``step()`` clips and updates; the learning rate is set just before."""
        ds = self.engine

        def backward(loss: torch.Tensor) -> None:
            ds.backward(loss)
            if not ds.is_gradient_accumulation_boundary():
                ds.step()

        n = self.cfg.train.grad_accum_steps
        loss, extras, tokens = accumulate_window(ds, backward, batches, loss_fn, n, self.device, self.token_share)
        assert ds.is_gradient_accumulation_boundary(), "the window must end at DeepSpeed's accumulation boundary"
        grad_norm, applied = self._boundary_step(lr)
        return StepResult(loss, tokens, grad_norm, applied, extras)

    def _boundary_step(self, lr: float) -> tuple[float, bool]:
        """The window's last step(): clip, update (DeepSpeed does both); (grad norm, applied)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.cfg.train.zero_stage == 0:
            # Without a ZeRO optimizer DeepSpeed does not check the norm: gradients that are not finite
            # are dropped here, and the optimizer then skips parameters without a gradient.
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.module.parameters() if p.grad is not None])
            if not torch.isfinite(norm):
                for p in self.module.parameters():
                    p.grad = None
                self.engine.step()
                return float("nan"), False
        self.engine.step()
        applied = self.engine.was_step_applied()
        norm = self.engine.get_global_grad_norm()
        if not applied or norm is None:
            return float("nan"), applied
        return float(norm), applied

    def save(self, path: Path) -> None:
        save_deepspeed_checkpoint(self.engine, path, self.module)

    def load(self, path: Path, saved_layout: ParallelLayout) -> None:
        load_deepspeed_checkpoint(self.engine, path, saved_layout, self.layout, self.module.config)


RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")  # copied beside a ZeRO checkpoint by DeepSpeed


def save_deepspeed_checkpoint(engine, path: Path, model: nn.Module) -> None:
    """Each rank writes its partition of the model and optimizer state under `path`, hashing the bytes
    as it writes them (hashed_writes); global rank 0 also claims DeepSpeed's recovery scripts, the only
    files DeepSpeed copies instead of saving. A tensor-parallel model also records how its slices
    merge, which the conversion to another layout reads."""
    from calm_pretrain.parallel.hashed_writes import claim_written, install_hashing_engine
    from calm_pretrain.parallel.tensor import universal_checkpoint_info

    info = universal_checkpoint_info(model)
    install_hashing_engine(engine)
    engine.save_checkpoint(str(path.parent), tag=path.name, save_latest=False,
                           client_state={"universal_checkpoint_info": info} if info else {})
    if engine.global_rank == 0:
        for script in RECOVERY_SCRIPTS:  # DeepSpeed copies them beside the tag's directory, not into it
            if (path.parent / script).is_file():
                claim_written(path.parent / script)


def load_deepspeed_checkpoint(engine, path: Path, saved: ParallelLayout, now: ParallelLayout, model_config) -> None:
    """Load a checkpoint written at layout `saved` into a run at layout `now`.

    At the same layout every rank reads its own files. At another one (TP, PP or DP size) the
    checkpoint is first converted, once, to DeepSpeed's universal format: every parameter's full fp32
    weight and Adam moments under its own name (DP partitions joined, TP slices merged as the saved
    model recorded), which each rank of the new layout slices again. Parameter names follow the engine:
    a pipeline's are ``<layer index>.<name in the layer>``, so a change between a pipeline and none
    renames them on the way. DeepSpeed's own torch.load calls go through the checkpoint allow-list
    (calm_pretrain.safe_load): no file is unpickled with arbitrary globals."""
    from calm_pretrain.safe_load import deepspeed_loads_safely

    with deepspeed_loads_safely():
        if saved == now:
            return _load(engine, path)
        _load(engine, _universal_copy(path, model_config, saved.pipeline > 1, now.pipeline > 1), universal=True)


def _load(engine, path: Path, universal: bool = False) -> None:
    engine._config.load_universal_checkpoint = universal
    try:
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=False, load_module_strict=True)
    finally:
        engine._config.load_universal_checkpoint = False
    if load_path is None:
        raise FileNotFoundError(f"{path}: DeepSpeed found no checkpoint to load")


def _universal_copy(path: Path, model_config, from_pipeline: bool, to_pipeline: bool) -> Path:
    """`path` converted (on rank 0, once per target naming) to the universal format, beside it."""
    from calm_pretrain.parallel.distributed import barrier, rank
    from calm_pretrain.parallel.universal import to_universal

    out = path.with_name(path.name + ("_universal_pipeline" if to_pipeline else "_universal"))
    if rank() == 0 and not (out / "zero").is_dir():
        tmp = path.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        os.replace(to_universal(path, tmp, model_config, from_pipeline, to_pipeline), out)
    barrier()
    return out
