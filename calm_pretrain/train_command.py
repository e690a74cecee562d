"""`calm-pretrain train`: one entry for the autoencoder, CALM and the Transformer baseline.

Launched directly (one process, plain PyTorch) or by torchrun / srun (DeepSpeed ZeRO over all ranks).
The run directory (``train.output_dir``) holds the resolved config, ``metrics.jsonl`` and
``checkpoints/``; launching the same command again resumes from its newest intact checkpoint.
Exit codes: 0 finished, REQUEUE_EXIT_CODE (75) saved on a signal or time budget, 1 failed.
"""
from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Callable, Optional

import torch

from calm_pretrain.config import ConfigError, RunConfig, dump_config
from calm_pretrain.models import build_model, spec_of
from calm_pretrain.models.calm import CALMConfig
from calm_pretrain.models.registry import training_flops_per_token
from calm_pretrain.parallel.distributed import all_gather_object, init_distributed, launched, local_rank, shutdown
from calm_pretrain.parallel.engine import DeepSpeedEngine, TorchEngine, build_model_sharded, gathered_for_writing
from calm_pretrain.parallel.groups import (ParallelCoords, ParallelLayout, deepspeed_topology, init_model_parallel,
                                           tensor_parallel_seed)
from calm_pretrain.parallel.plan import apply_activation_checkpointing, apply_compile, mark_zero3_leaves
from calm_pretrain.train.callbacks import EvalCallback, TensorBoardCallback, WandbCallback
from calm_pretrain.train.checkpoint import Checkpointer
from calm_pretrain.train.console import filter_harmless_warnings
from calm_pretrain.train.hardware import peak_flops
from calm_pretrain.train.launcher import WorkerSession
from calm_pretrain.train.run_lock import lock_run_directory
from calm_pretrain.train.signals import REQUEUE_EXIT_CODE, StopRequest
from calm_pretrain.train.trainer import Trainer


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def load_frozen_autoencoder(cfg: RunConfig) -> Optional[torch.nn.Module]:
    """CALM's frozen AE (`model.ae_path`), or None. Loaded once per run, before any seed is set, so a
    run draws the same random numbers with or without it."""
    if not (spec_of(cfg.model).uses_autoencoder and cfg.model.ae_path):
        return None
    from calm_pretrain.release.autoencoder import load_autoencoder

    return load_autoencoder(cfg.model.ae_path).eval()


def data_expectations(cfg: RunConfig, ae: Optional[torch.nn.Module] = None) -> dict:
    """What the shards must have been made for: the loader refuses anything else, naming the file.
    With CALM's frozen AE given, latent shards must also have been encoded by it. With
    data.latents=on_the_fly the shards are token shards of the same samples (L·K tokens), ids only: the
    latents' K and size are the AE's (checked by OnTheFlyLatents), its fingerprint the trainer state's."""
    expect = spec_of(cfg.model).data(cfg.model, cfg.data.seq_chunks)
    if cfg.data.latents == "on_the_fly":
        return {**{key: v for key, v in expect.items() if key not in ("k", "latent_dim", "ae_fingerprint")},
                "kind": "tokens"}
    if ae is not None:
        from data_pipeline.ae_io import autoencoder_fingerprint

        expect["ae_fingerprint"] = autoencoder_fingerprint(ae)
    return expect


def build_latent_transform(cfg: RunConfig, ae: Optional[torch.nn.Module], device: torch.device):
    """data.latents=on_the_fly: the frozen AE encoding every micro-batch on `device` (None when stored)."""
    if cfg.data.latents != "on_the_fly":
        return None
    from data_pipeline.on_the_fly import OnTheFlyLatents

    if ae is None:  # config validation requires model.ae_path; a caller passing no AE is a bug of its own
        raise ConfigError("data.latents: on_the_fly needs the frozen autoencoder (model.ae_path)")
    return OnTheFlyLatents(ae, device, k=cfg.model.k, latent_dim=cfg.model.latent_dim, where=cfg.model.ae_path)


def check_data(cfg: RunConfig) -> None:
    """What can be checked before anything is built: training shards are given, and held-out shards
    (data.eval) were made with the training data's tokenizer (else eval/brierlm scores other ids)."""
    if not cfg.data.train:
        raise ConfigError("data.train: no training shards given (a list of shard directories)")
    if not cfg.data.eval:
        return
    from data_pipeline.errors import IncompatibleDataError
    from data_pipeline.manifest import load_manifest

    train = load_manifest(cfg.data.train[0])
    for path in [cfg.data.eval] if isinstance(cfg.data.eval, str) else cfg.data.eval:
        held_out = load_manifest(path)
        if held_out.tokenizer_fingerprint != train.tokenizer_fingerprint:
            raise IncompatibleDataError(
                f"data.eval {held_out.path} was made with another tokenizer (fingerprint "
                f"{held_out.tokenizer_fingerprint}) than the training data {train.path} (fingerprint "
                f"{train.tokenizer_fingerprint}): its scores would be computed on other token ids")


def build_loader(cfg: RunConfig, dp_rank: int, dp_world_size: int, ae: Optional[torch.nn.Module] = None):
    from data_pipeline.loader import ShardLoader

    if not cfg.data.train:
        raise ConfigError("data.train: no training shards given (a list of shard directories)")
    t = cfg.train
    return ShardLoader(cfg.data.train, cfg.data.weights or None,
                       global_batch_size=t.micro_batch_size * t.grad_accum_steps * dp_world_size,
                       micro_batch_size=t.micro_batch_size, dp_rank=dp_rank, dp_world_size=dp_world_size,
                       seed=cfg.data.seed, expect=data_expectations(cfg, ae), pin_memory=True,
                       return_index=True)  # so a skipped step can name the samples that were not finite


def held_out_blocks(cfg: RunConfig) -> list[torch.Tensor]:
    """The token blocks every evaluation of this run scores: `eval.max_blocks` (0: all) of `data.eval`,
    spread over the held-out set by a fixed seed (calm_pretrain.eval.source.heldout_blocks)."""
    from calm_pretrain.eval.source import heldout_blocks

    return heldout_blocks(cfg.data.eval, cfg.eval.max_blocks)


def build_evaluator(cfg: RunConfig, ae: Optional[torch.nn.Module] = None) -> Optional[Callable]:
    """The periodic evaluation of `data.eval` (held-out token shards), calm_pretrain.eval.heldout:
    AE reconstruction (clean and under latent noise); for CALM (needs its frozen AE, `ae`) BrierLM,
    Brier-n and the energy skill with standard errors; for the Transformer BrierLM and Brier-n."""
    if not cfg.data.eval:
        return None
    from calm_pretrain.eval.heldout import evaluate_model, numbers

    if spec_of(cfg.model).uses_autoencoder and ae is None:
        raise ConfigError(f"data.eval is set for a {cfg.model.arch} run but model.ae_path is not: its scores "
                          "need the autoencoder")
    blocks = held_out_blocks(cfg)

    def evaluate(model):
        return numbers(evaluate_model(model, blocks, ae=ae))
    return evaluate


def _init_from_release(model, path: str, say, cfg: RunConfig, ae: Optional[torch.nn.Module]) -> None:
    """Start from a release's weights (continued pretraining); a checkpoint of this run, when there is
    one, is loaded over them by the resume. Under ZeRO-3 each parameter is gathered while it is set."""
    from calm_pretrain.release import import_release

    released, released_cfg = import_release(path)
    if released_cfg.arch != model.config.arch:
        raise ConfigError(f"train.init_from: {path} holds a {released_cfg.arch} release, the run trains "
                         f"{model.config.arch}")
    if spec_of(released_cfg).uses_autoencoder:
        _check_release_autoencoder(path, released_cfg, cfg, ae)
    state = released.state_dict()
    own = dict(model.named_parameters())
    for name, p in own.items():
        if name not in state or tuple(state[name].shape) != tuple(getattr(p, "ds_shape", p.shape)):
            raise ConfigError(f"train.init_from: {path} does not fit this model at {name}")
        with gathered_for_writing([p]), torch.no_grad():
            p.copy_(state[name])
    say(f"initialised {len(own)} parameters from the release {path}")


def _parameters_label(cfg: RunConfig, model: torch.nn.Module) -> str:
    """The model's parameter count (from its config: tied weights once), and this rank's share when
    tensor or pipeline parallelism splits it (ZeRO-3's partitioned tensors keep their full ds_numel)."""
    from calm_pretrain.models import count_config_parameters

    total = count_config_parameters(cfg.model)["total"]
    label = f"{total / 1e6:.2f}M parameters"
    if cfg.parallel.tensor * cfg.parallel.pipeline > 1:
        held = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        label += f" ({held / 1e6:.2f}M on rank 0 at TP {cfg.parallel.tensor} × PP {cfg.parallel.pipeline})"
    return label


def _check_release_autoencoder(path: str, released_cfg: CALMConfig, cfg: RunConfig,
                               ae: Optional[torch.nn.Module]) -> None:
    """A CALM continues only on latents of the autoencoder it was trained with: the one its release
    records (or embeds), else, for a published release that only names a path on its authors' machine,
    the one the user supplies as model.ae_path (`train --ae DIR`), whose latents the loader then checks."""
    from calm_pretrain.release import ReleaseError, import_release_ae
    from calm_pretrain.release.load import has_embedded_ae, recorded_ae_fingerprint
    from data_pipeline.ae_io import autoencoder_fingerprint
    from data_pipeline.manifest import load_manifest

    try:
        recorded = recorded_ae_fingerprint(path)
        if recorded is None and has_embedded_ae(path):
            recorded = autoencoder_fingerprint(import_release_ae(path)[0])
    except ReleaseError as e:
        raise ConfigError(f"train.init_from: {e}") from None
    if recorded is None:
        if ae is None:
            raise ConfigError(f"train.init_from: {path} is a CALM release that neither embeds nor records its "
                              f"autoencoder (its ae_path: {released_cfg.ae_path!r}): set model.ae_path "
                              "(calm-pretrain train --ae DIR) to the autoencoder it was trained with")
        return
    given = autoencoder_fingerprint(ae) if ae is not None else recorded
    if given != recorded:
        raise ConfigError(f"train.init_from: {path} was trained with autoencoder {recorded}; model.ae_path "
                          f"{cfg.model.ae_path} is autoencoder {given}")
    if cfg.data.latents == "on_the_fly":  # the given AE (checked above) encodes the token shards in the step
        return
    for shards in cfg.data.train:
        encoded_by = load_manifest(shards).ae_fingerprint
        if encoded_by != recorded:
            raise ConfigError(f"train.init_from: {path} was trained on latents of autoencoder {recorded}; "
                              f"data.train {shards} was encoded by {encoded_by}")


def _layout(cfg: RunConfig, rank: int, world_size: int):
    """(this rank's ParallelCoords, DeepSpeed pipeline topology or None). Model-parallel groups come
    from megatron-core, checked against DeepSpeed's topology (same rank order) at start-up."""
    layout = ParallelLayout.of_run(cfg.parallel, world_size)  # refuses sizes that do not divide the world
    tp, pp = layout.tensor, layout.pipeline
    if tp == 1 and pp == 1:
        return ParallelCoords(dp_rank=rank, dp_size=world_size), None
    coords = init_model_parallel(tp, pp, cfg.train.dist_timeout_minutes)
    return coords, (deepspeed_topology(tp, pp, world_size) if pp > 1 else None)


def run_training(cfg: RunConfig, log: Callable[[str], None] = print) -> int:
    filter_harmless_warnings()
    # Installed first: a preemption signal during start-up is then honoured at the first step boundary.
    stop = StopRequest(cfg.train.exit_after_minutes, log=log)
    session = WorkerSession(stop, log)  # under torchrun: stop when it is gone; report the exit code
    code = 1
    try:
        with contextlib.ExitStack() as cleanup:  # releases the run directory's lock
            code = _run(cfg, stop, log, cleanup)
        return code
    finally:
        session.close(code)  # before anything else: torchrun may SIGTERM this rank once a sibling exited
        stop.close()
        shutdown()


def _build_planned_model(cfg: RunConfig, device, world_size: int, use_deepspeed: bool, ae, say) -> torch.nn.Module:
    """The model with the same initial weights on every rank (or a release's), then the plans that
    apply to it: tensor-parallel splits, activation checkpointing, ZeRO-3 leaves, compilation."""
    torch.manual_seed(cfg.train.seed)
    with torch.device(device):
        model = build_model_sharded(cfg, lambda: build_model(cfg.model), world_size) if use_deepspeed \
            else build_model(cfg.model)
    if cfg.train.init_from:
        _init_from_release(model, cfg.train.init_from, say, cfg, ae)
    if cfg.parallel.tensor > 1:
        from calm_pretrain.parallel.tensor import apply_tensor_parallel

        say(f"tensor parallel: {apply_tensor_parallel(model)} layers split over {cfg.parallel.tensor} ranks")
    if cfg.train.activation_checkpointing:
        say(f"activation checkpointing on {apply_activation_checkpointing(model)} blocks")
    if use_deepspeed and cfg.train.zero_stage == 3:
        mark_zero3_leaves(model)
    if cfg.train.compile:  # last: it compiles the blocks as the plans above left them
        say(f"torch.compile on {apply_compile(model)} blocks (the first steps compile them)")
    return model


def _callbacks(cfg: RunConfig, out: Path, rank: int, ae, pipelined: bool, say) -> list:
    """The optional features a run config turns on: wandb, TensorBoard, the periodic held-out eval."""
    callbacks = []
    if cfg.train.wandb != "off":
        callbacks.append(WandbCallback(out, cfg.to_dict(), cfg.train.wandb_project, cfg.name, cfg.train.wandb, rank))
    if cfg.train.tensorboard:
        callbacks.append(TensorBoardCallback(out / "tensorboard", rank))
    evaluate = build_evaluator(cfg, ae)
    if evaluate is not None and pipelined:
        say("data.eval: periodic evaluation is not run under pipeline parallelism (no rank holds the whole "
            "model); evaluate the exported release instead")
    elif evaluate is not None:
        callbacks.append(EvalCallback(evaluate, cfg.train.eval_every))
    return callbacks


def _run(cfg: RunConfig, stop: StopRequest, log: Callable[[str], None], cleanup: contextlib.ExitStack) -> int:
    rank, world_size = init_distributed(cfg.train.dist_timeout_minutes)
    use_deepspeed = cfg.train.engine == "deepspeed" or (cfg.train.engine == "auto" and launched())
    if world_size > 1 and not use_deepspeed:
        raise ConfigError("train.engine=torch runs in one process only; launch without torchrun or use deepspeed")
    if use_deepspeed and not launched():  # DeepSpeed would look for MPI (mpi4py) to find its ranks
        raise ConfigError("train.engine=deepspeed needs ranks from a launcher: run it under torchrun "
                          "(calm-pretrain launch --standalone --nproc-per-node N -- train ...) or srun")
    device = _device()
    coords, topology = _layout(cfg, rank, world_size)
    out = Path(cfg.train.output_dir)
    say = log if rank == 0 else (lambda s: None)
    # Before anything is written there: a second run into a live run's directory is refused.
    lock = lock_run_directory(out, rank, say)
    if lock is not None:
        cleanup.callback(lock.release)

    # One line per rank: who it is, where it runs, and which groups it belongs to.
    line = (f"rank {rank}/{world_size} host {socket.gethostname()} pid {os.getpid()} device {device} "
            f"local_rank {local_rank()} {coords.describe()}")
    ranks = all_gather_object(line)
    for each in ranks:  # printed once, by rank 0, in rank order
        say(each)
    check_data(cfg)  # before the model is built

    ae = load_frozen_autoencoder(cfg)
    model = _build_planned_model(cfg, device, world_size, use_deepspeed, ae, say)
    # Noise (energy-head samples, AE masking) differs between data-parallel replicas and is the same on
    # the ranks of one replica (its replicated head must see one draw); checkpoints keep it.
    torch.manual_seed(tensor_parallel_seed(cfg.train.seed, coords))

    loader = build_loader(cfg, coords.dp_rank, coords.dp_size, ae)
    latents = build_latent_transform(cfg, ae, device)  # None: the loader's latent shards hold them
    if latents is not None:
        latents.check_tokens(loader.manifests)
    if topology is not None:
        from calm_pretrain.parallel.pipeline import PipelineEngine

        engine = PipelineEngine(model, cfg, topology, world_size)
    elif use_deepspeed:
        from calm_pretrain.parallel.groups import DeepSpeedMPU

        engine = DeepSpeedEngine(model, cfg, world_size, mpu=DeepSpeedMPU() if cfg.parallel.tensor > 1 else None)
    else:
        engine = TorchEngine(model, cfg)
    if not use_deepspeed:
        engine.module.to(device)

    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    peak, peak_source = peak_flops(device, bf16, cfg.train.peak_flops)
    context = cfg.data.seq_chunks
    # On the fly, the AE encoder runs in the step: its forward pass counts (MFU, the FLOPs line).
    flops = training_flops_per_token(cfg.model, context, latents.ae.config if latents else None).total
    params = _parameters_label(cfg, model)
    say(f"[{cfg.name}] {cfg.model.arch}, {params}, {flops / 1e6:.1f} MFLOPs/token; "
        f"peak {peak / 1e12:.2f} TFLOP/s per device ({peak_source}); engine "
        f"{'DeepSpeed ZeRO-' + str(cfg.train.zero_stage) if use_deepspeed else 'torch'}; world size {world_size}"
        + (f"; latents on the fly (autoencoder {latents.fingerprint} on {device})" if latents else ""))

    trainer = Trainer(cfg, engine.module, loader, out, engine=engine, log=log,
                      callbacks=_callbacks(cfg, out, rank, ae, pipelined=topology is not None, say=say),
                      checkpointer=Checkpointer(out / "checkpoints", cfg.train.keep_last, rank, world_size, log=say),
                      stop=stop, rank=rank, world_size=world_size, flops_per_token=flops, peak_flops=peak,
                      batch_transform=latents)
    try:
        trainer.resume()
        if rank == 0:  # only now: a refused resume leaves the run's record of itself as it was
            (out / "config.yaml").write_text(dump_config(cfg))
            (out / "ranks.txt").write_text("\n".join(ranks) + "\n")
        if trainer.step >= cfg.train.max_steps:
            say(f"[{cfg.name}] already trained to step {trainer.step} (train.max_steps={cfg.train.max_steps})")
            return 0
        trainer.fit()
    finally:
        loader.close()
    if trainer.exit_reason == "preempted":
        say(f"[{cfg.name}] saved at step {trainer.step}; exiting with {REQUEUE_EXIT_CODE} so the job is requeued")
        return REQUEUE_EXIT_CODE
    say(f"[{cfg.name}] finished: step {trainer.step}, {params}, checkpoints in {out / 'checkpoints'}")
    return 0
