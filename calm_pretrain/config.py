"""Typed run configuration: dataclasses, YAML files and dotted command-line overrides.

Every default lives in the dataclasses below (and, for the ``model`` section, in each architecture's
own config dataclass), in one visible place. A YAML file and overrides such as ``model.k=8
train.lr=1e-4`` are applied on top; an unknown key, a value of the wrong type or an impossible
combination raises one :class:`ConfigError` that names the dotted key.

The ``model`` section is a tagged union: ``model.arch`` picks the architecture (calm_pretrain/models/
registry.py) whose dataclass the rest of the section is checked against.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from calm_pretrain.models.calm.config import CALMConfig
from calm_pretrain.models.registry import architectures, spec_of
from calm_pretrain.schema import ConfigError, build_dataclass, check, parse_override, set_dotted

__all__ = ["ConfigError", "DataConfig", "TrainConfig", "EvalConfig", "ParallelConfig", "RunConfig",
           "load_config", "config_from_dict", "model_config_from_dict", "dump_config", "validate_sections"]


LATENT_SOURCES = ("stored", "on_the_fly")


# --------------------------------------------------------------------------------------------
# Run sections (the trainer issue extends these; keep every default here)
# --------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    train: list = field(default_factory=list)  # shard directories (manifest.json inside)
    weights: list = field(default_factory=list)  # blend weights, one per train entry (empty = equal)
    eval: Optional[str] = None
    seq_chunks: int = 512  # L: chunk positions per sample (tokens per sample = L·K)
    seed: int = 1234
    # Where a model on a frozen AE's latents (CALM) gets them: `stored` reads latent shards (calm-data
    # encode); `on_the_fly` reads token shards and runs the frozen AE (model.ae_path) in every step.
    latents: str = "stored"  # stored | on_the_fly

    def validate(self, p: str) -> None:
        check(self.seq_chunks >= 2, f"{p}.seq_chunks", "must be >= 2 (position i predicts chunk i+1)")
        check(self.latents in LATENT_SOURCES, f"{p}.latents",
              f"must be {' or '.join(LATENT_SOURCES)}, got {self.latents!r}")
        check(not self.weights or len(self.weights) == len(self.train), f"{p}.weights",
               f"has {len(self.weights)} entries but {p}.train has {len(self.train)}")


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 1
    max_steps: int = 1000
    micro_batch_size: int = 4
    grad_accum_steps: int = 1
    lr: float = 3e-4
    min_lr: float = 0.0
    warmup_steps: int = 2000
    lr_decay: str = "constant"  # constant | cosine
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    zero_stage: int = 1
    offload_optimizer: bool = False  # optimizer state (and its step) on the CPU: ZeRO-Offload
    # Elements per ZeRO communication bucket (reduce, all-gather, ZeRO-3 prefetch). DeepSpeed's default
    # of 5e8 costs 1-2 GB per bucket; 5e7 is what GPT-NeoX and Megatron-DeepSpeed run with.
    zero_bucket_elements: int = 50_000_000
    zero3_max_live_parameters: int = 100_000_000  # gathered ZeRO-3 parameters kept alive at once
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    compile: bool = False  # torch.compile each block in place (decoder layers, the head): docs/performance.md
    log_every: int = 10
    eval_every: int = 1000
    save_every: int = 1000
    keep_last: int = 3
    # Write checkpoints on a background thread: a save blocks training only while the state is copied
    # to host memory (one more copy of this rank's checkpoint in RAM until it is written), and is
    # committed at the first log step after every rank's files are on disk (docs/checkpoints.md).
    async_save: bool = False
    max_nonfinite_steps: int = 20  # non-finite steps in a row (each skipped) before the run stops
    # Divergence (calm_pretrain/train/divergence.py): a step whose loss or gradient norm is more than
    # divergence_ratio times its running median (over the last divergence_window unsuspected steps, once
    # divergence_warmup of them were seen) and above it by at least divergence_min_increase is suspect;
    # its episode pins the last checkpoint before it, and divergence_patience suspect steps in a row stop
    # the run. divergence_ratio=0 turns it off.
    divergence_ratio: float = 10.0
    divergence_min_increase: float = 1.0
    divergence_grad_norm_ratio: float = 100.0  # the gradient norm's own ratio (10x spikes are common)
    divergence_warmup: int = 50
    divergence_window: int = 100
    divergence_patience: int = 10
    init_from: str = ""  # a release directory whose weights start the run (ignored once a checkpoint exists)
    engine: str = "auto"  # auto (DeepSpeed under torchrun/srun, plain PyTorch in one process) | torch | deepspeed
    exit_after_minutes: float = 0.0  # save and exit with the requeue code after this long (0 = never)
    dist_timeout_minutes: float = 30.0  # collective timeout (NCCL/gloo): a hung rank fails the job after this
    peak_flops: float = 0.0  # per-device peak for MFU; 0 = from the GPU model, or a measured matmul peak on CPU
    wandb: str = "auto"  # auto (offline without WANDB_API_KEY) | online | offline | off
    wandb_project: str = "calm-pretrain"
    tensorboard: bool = False

    def validate(self, p: str) -> None:
        check(self.engine in ("auto", "torch", "deepspeed"), f"{p}.engine",
               f"must be auto, torch or deepspeed, got {self.engine!r}")
        check(self.wandb in ("auto", "online", "offline", "off"), f"{p}.wandb",
               f"must be auto, online, offline or off, got {self.wandb!r}")
        check(self.exit_after_minutes >= 0, f"{p}.exit_after_minutes", "must be >= 0")
        check(self.dist_timeout_minutes > 0, f"{p}.dist_timeout_minutes", "must be > 0")
        check(self.lr_decay in ("constant", "cosine"), f"{p}.lr_decay",
               f"must be 'constant' or 'cosine', got {self.lr_decay!r}")
        check(self.precision in ("auto", "bf16", "fp32"), f"{p}.precision",
               f"must be auto, bf16 or fp32, got {self.precision!r}")
        check(self.zero_stage in (0, 1, 2, 3), f"{p}.zero_stage", f"must be 0..3, got {self.zero_stage}")
        for name in ("max_steps", "micro_batch_size", "grad_accum_steps", "log_every", "eval_every",
                     "save_every", "keep_last", "max_nonfinite_steps", "zero_bucket_elements",
                     "zero3_max_live_parameters", "divergence_window", "divergence_patience"):
            check(getattr(self, name) >= 1, f"{p}.{name}", f"must be >= 1, got {getattr(self, name)}")
        check(self.warmup_steps >= 0, f"{p}.warmup_steps", "must be >= 0")
        check(self.divergence_warmup >= 1, f"{p}.divergence_warmup", "must be >= 1")
        check(self.divergence_ratio == 0 or self.divergence_ratio > 1, f"{p}.divergence_ratio",
               f"must be 0 (off) or > 1, got {self.divergence_ratio}")
        check(self.divergence_min_increase >= 0, f"{p}.divergence_min_increase", "must be >= 0")
        check(self.divergence_grad_norm_ratio == 0 or self.divergence_grad_norm_ratio > 1,
               f"{p}.divergence_grad_norm_ratio", f"must be 0 (off) or > 1, got {self.divergence_grad_norm_ratio}")
        check(self.lr > 0 and 0 <= self.min_lr <= self.lr, f"{p}.min_lr",
               f"need 0 <= min_lr <= lr and lr > 0 (lr={self.lr}, min_lr={self.min_lr})")


@dataclass
class EvalConfig:
    """The periodic held-out evaluation of `data.eval` (every `train.eval_every` steps)."""

    # The evaluation block in tokens: the main job cuts its held-out shards to it (it changes BrierLM, so
    # it is recorded with every score); a run scores the held-out shards' own samples.
    block_tokens: int = 2048
    max_blocks: int = 16  # held-out blocks scored, spread over the set by a fixed seed; 0 = all blocks

    def validate(self, p: str) -> None:
        check(self.block_tokens >= 2, f"{p}.block_tokens", "must be >= 2")
        check(self.max_blocks >= 0, f"{p}.max_blocks", "must be >= 0")


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1

    def validate(self, p: str) -> None:
        check(self.tensor >= 1, f"{p}.tensor", "must be >= 1")
        check(self.pipeline >= 1, f"{p}.pipeline", "must be >= 1")


def validate_sections(cfg) -> None:
    """Call `validate(name)` on every dataclass field of `cfg` (the sections of a run or pipeline config)."""
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section):
            section.validate(f.name)


@dataclass
class RunConfig:
    name: str = "run"
    model: Any = field(default_factory=CALMConfig, metadata={"build": lambda values, key: build_model_config(values, key)})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> "RunConfig":
        validate_sections(self)
        tensor, pipeline = self.parallel.tensor, self.parallel.pipeline
        if pipeline > 1:
            check(self.train.zero_stage in (0, 1), "train.zero_stage",
                  f"= {self.train.zero_stage} cannot go with parallel.pipeline = {pipeline}: "
                  "DeepSpeed's pipeline engine supports ZeRO stage 0 or 1; set train.zero_stage=1")
        if self.train.compile:
            check(self.train.zero_stage != 3, "train.compile",
                  "cannot go with train.zero_stage = 3: ZeRO-3 gathers each block's parameters in module hooks "
                  "that compiled blocks would trace around; use train.zero_stage <= 2, or train.compile=false")
        if tensor > 1:
            check(self.train.zero_stage in (0, 1, 2), "train.zero_stage",
                  f"= 3 cannot go with parallel.tensor = {tensor}: tensor parallelism splits "
                  "the full weights, which ZeRO-3 never materialises; use train.zero_stage=1")
        self.model.validate_parallel(tensor, pipeline)
        self._validate_latents()
        return self

    def _validate_latents(self) -> None:
        """data.latents=on_the_fly encodes with the run's frozen AE: the model must train on one, and name it."""
        if self.data.latents != "on_the_fly":
            return
        check(spec_of(self.model).uses_autoencoder, "data.latents",
              f"= on_the_fly encodes latents with a frozen autoencoder, but a {self.model.arch} model trains on "
              "token shards directly; leave data.latents = stored")
        check(bool(getattr(self.model, "ae_path", None)), "data.latents",
              "= on_the_fly runs the frozen autoencoder in every step, but model.ae_path is not set: name the "
              "autoencoder directory (calm-pretrain train --ae DIR), or train on latent shards (data.latents=stored)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_from_dict(tree: dict) -> RunConfig:
    return build_dataclass(RunConfig, tree, "").validate()


def load_config(path: Optional[str | Path] = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Load a run config from YAML (optional) and apply dotted overrides; validate everything."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        tree = loaded
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(tree, key, value)
    _require_arch(tree, path)
    try:
        return config_from_dict(tree)
    except ConfigError as e:
        if path is not None:
            raise ConfigError(f"{e} (in {path})") from None
        raise


def _require_arch(tree: dict, path: Optional[Path]) -> None:
    """A run config names its model: an empty or model-less file would otherwise train the default
    architecture (CALM-M, 371M parameters) with every default, silently."""
    model = tree.get("model")
    if isinstance(model, dict) and model.get("arch") is not None:
        return
    where = f"{path}: " if path is not None else ""
    what = "is empty" if not tree else ("has no model section" if model is None else "has no model.arch")
    raise ConfigError(f"{where}model.arch: missing (the config {what}); say which model to train: "
                      f"{' | '.join(sorted(architectures()))}, in the YAML or as an override (model.arch=calm)")


def build_model_config(values: Any, key: str = "model") -> Any:
    """The `model` section: `model.arch` picks the architecture's dataclass from the registry."""
    if dataclasses.is_dataclass(values):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"{key}: expected a mapping, got {values!r}")
    return build_dataclass(spec_of(values.get("arch", "calm"), key).config, values, key)


def model_config_from_dict(values: dict) -> Any:
    """Build and validate only a model section (used for checkpoints and release imports)."""
    cfg = build_model_config(dict(values), "model")
    cfg.validate("model")
    return cfg


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
