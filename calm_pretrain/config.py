"""Typed run configuration: dataclasses, YAML files and dotted command-line overrides.

Every default lives in the dataclasses below, in one visible place. A YAML file and overrides
such as ``model.k=8 train.lr=1e-4`` are applied on top; an unknown key, a value of the wrong type
or an impossible combination raises one :class:`ConfigError` that names the dotted key.

The ``model`` section is a tagged union: ``model.arch`` (autoencoder | calm | transformer) picks
the dataclass that the rest of the section is checked against.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the offending dotted key."""


# --------------------------------------------------------------------------------------------
# Model sections
# --------------------------------------------------------------------------------------------
@dataclass
class AutoencoderConfig:
    """The token-chunk autoencoder (docs/method.md, 'Autoencoder'). Defaults are the published K=4 / d=128 AE."""

    arch: str = "autoencoder"
    k: int = 4  # tokens per chunk ("patch_size")
    latent_dim: int = 128
    vocab_size: int = 128257
    hidden_size: int = 512
    intermediate_size: int = 1280
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    norm_eps: float = 1e-6
    token_mask_prob: float = 0.15  # masked ids are replaced by `mask_token_id` (id 0, as published)
    mask_token_id: int = 0
    latent_dropout: float = 0.15
    kl_clamp: float = 0.5  # per-dimension KL floor ("free bits")
    kl_weight: float = 1e-3
    init_std: float = 0.02
    pad_token_id: int = 128256
    eos_token_id: int = 128001
    bos_token_id: int = 128000

    def validate(self, p: str) -> None:
        _check(self.k >= 1, f"{p}.k", f"must be >= 1, got {self.k}")
        for name in ("latent_dim", "vocab_size", "hidden_size", "intermediate_size"):
            _check(getattr(self, name) >= 1, f"{p}.{name}", "must be >= 1")
        for name in ("num_encoder_layers", "num_decoder_layers"):
            n = getattr(self, name)
            _check(n >= 2 and n % 2 == 0, f"{p}.{name}",
                   f"must be an even number >= 2 (split into two stages), got {n}")
        for name in ("token_mask_prob", "latent_dropout"):
            v = getattr(self, name)
            _check(0.0 <= v < 1.0, f"{p}.{name}", f"must be in [0, 1), got {v}")
        for name in ("pad_token_id", "eos_token_id", "bos_token_id", "mask_token_id"):
            v = getattr(self, name)
            _check(0 <= v < self.vocab_size, f"{p}.{name}",
                   f"= {v} is outside the vocabulary (vocab_size = {self.vocab_size})")


@dataclass
class HeadConfig:
    """The generative head of CALM (docs/method.md, 'Energy head'); `type` selects a head from the registry."""

    type: str = "energy"  # energy | flow | diffusion | gmm | mse (models/heads.py HEADS)
    num_blocks: int = 4  # residual MLP blocks ("num_mlp_layers"); the depth of every head's network
    noise_size: int = 64  # energy head only
    # energy: N head samples per position for the energy loss; flow, diffusion, gmm: posterior
    # samples per position used as training targets (the reference trains on 8); mse: unused
    num_samples: int = 8
    # energy head only
    num_target_samples: int = 100  # M: posterior samples per position
    alpha: float = 1.0  # exponent of the distance in the energy score ("beta" in the reference)
    loss_chunk_positions: int = 1024  # positions per chunk in the fused energy loss (bounds memory)
    # flow head: ODE solver steps (network evaluations = steps, ×2 for midpoint; reference: 20)
    flow_steps: int = 10
    flow_solver: str = "midpoint"  # euler | midpoint
    # diffusion head: discrete training steps T of the cosine schedule, DDIM sampling steps S <= T
    diffusion_train_steps: int = 1000
    diffusion_steps: int = 100
    # gmm head: mixture components
    num_components: int = 8
    # Width-aware init of the head (docs/method.md, 'Head initialisation at small width'): below this width the head's
    # weights are drawn with std model.init_std · sqrt(init_reference_width / H), so a narrow head
    # starts as sensitive to its condition as CALM-M's (H = 1024) does; at or above it, and with 0,
    # the head gets model.init_std exactly as published.
    init_reference_width: int = 1024

    def validate(self, p: str) -> None:
        from calm_pretrain.models.heads import HEADS  # the registry is the source of truth

        _check(self.type in HEADS, f"{p}.type", f"unknown head {self.type!r}; known: {sorted(HEADS)}")
        _check(self.num_blocks >= 1, f"{p}.num_blocks", "must be >= 1")
        _check(self.noise_size >= 1, f"{p}.noise_size", "must be >= 1")
        if self.type == "energy":
            _check(self.num_samples >= 2, f"{p}.num_samples",
                   f"must be >= 2 (the energy score's model-model term needs two samples), got {self.num_samples}")
            _check(0.0 < self.alpha < 2.0, f"{p}.alpha",
                   f"must be in (0, 2) for a strictly proper energy score, got {self.alpha}")
        else:
            _check(self.num_samples >= 1, f"{p}.num_samples", f"must be >= 1, got {self.num_samples}")
        _check(self.num_target_samples >= 1, f"{p}.num_target_samples", "must be >= 1")
        _check(self.init_reference_width >= 0, f"{p}.init_reference_width", "must be >= 0 (0: no width scaling)")
        _check(self.loss_chunk_positions >= 1, f"{p}.loss_chunk_positions", "must be >= 1")
        _check(self.flow_steps >= 1, f"{p}.flow_steps", f"must be >= 1, got {self.flow_steps}")
        _check(self.flow_solver in ("euler", "midpoint"), f"{p}.flow_solver",
               f"must be 'euler' or 'midpoint', got {self.flow_solver!r}")
        _check(self.diffusion_train_steps >= 2, f"{p}.diffusion_train_steps",
               f"must be >= 2, got {self.diffusion_train_steps}")
        _check(1 <= self.diffusion_steps <= self.diffusion_train_steps, f"{p}.diffusion_steps",
               f"must be in [1, diffusion_train_steps = {self.diffusion_train_steps}], got {self.diffusion_steps}")
        _check(self.num_components >= 1, f"{p}.num_components", f"must be >= 1, got {self.num_components}")


@dataclass
class BackboneConfig:
    """A Llama-style decoder (RoPE, SwiGLU, RMSNorm, optional GQA). Defaults are CALM-M's."""

    vocab_size: int = 128257
    hidden_size: int = 1024
    intermediate_size: int = 2752
    num_layers: int = 16
    num_heads: int = 16
    num_kv_heads: int = 16
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-6
    init_std: float = 0.02
    pad_token_id: int = 128256
    eos_token_id: int = 128001
    bos_token_id: int = 128000

    def validate(self, p: str) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "max_position_embeddings"):
            _check(getattr(self, name) >= 1, f"{p}.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(self.hidden_size % self.num_heads == 0, f"{p}.hidden_size",
               f"= {self.hidden_size} is not divisible by {p}.num_heads = {self.num_heads}")
        _check((self.hidden_size // self.num_heads) % 2 == 0, f"{p}.num_heads",
               f"head dim {self.hidden_size // self.num_heads} must be even for RoPE")
        _check(self.num_heads % self.num_kv_heads == 0, f"{p}.num_kv_heads",
               f"= {self.num_kv_heads} must divide {p}.num_heads = {self.num_heads}")
        for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
            v = getattr(self, name)
            _check(0 <= v < self.vocab_size, f"{p}.{name}",
                   f"= {v} is outside the vocabulary (vocab_size = {self.vocab_size})")


@dataclass
class CALMConfig(BackboneConfig):
    """CALM LM: input compression of K tokens + backbone + generative head (docs/method.md, 'CALM language model')."""

    arch: str = "calm"
    k: int = 4
    latent_dim: int = 128
    head: HeadConfig = field(default_factory=HeadConfig)
    ae_path: Optional[str] = None  # frozen autoencoder (release directory) for encoding/eval/generation

    def validate(self, p: str) -> None:
        super().validate(p)
        _check(self.k >= 1, f"{p}.k", f"must be >= 1, got {self.k}")
        _check(self.latent_dim >= 1, f"{p}.latent_dim", "must be >= 1")
        self.head.validate(f"{p}.head")


@dataclass
class TransformerConfig(BackboneConfig):
    """The discrete next-token baseline on the same backbone, with an untied LM head."""

    arch: str = "transformer"

    def validate(self, p: str) -> None:
        super().validate(p)


MODEL_CONFIGS: dict[str, type] = {
    "autoencoder": AutoencoderConfig,
    "calm": CALMConfig,
    "transformer": TransformerConfig,
}
ModelConfig = typing.Union[AutoencoderConfig, CALMConfig, TransformerConfig]


# --------------------------------------------------------------------------------------------
# Run sections (the trainer issue extends these; keep every default here)
# --------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    train: list = field(default_factory=list)  # shard directories (manifest.json inside)
    weights: list = field(default_factory=list)  # blend weights, one per train entry (empty = equal)
    eval: Optional[str] = None
    seq_chunks: int = 512  # L: chunk positions per sample (tokens per sample = L·K)
    num_workers: int = 1
    seed: int = 1234

    def validate(self, p: str) -> None:
        _check(self.seq_chunks >= 2, f"{p}.seq_chunks", "must be >= 2 (position i predicts chunk i+1)")
        _check(not self.weights or len(self.weights) == len(self.train), f"{p}.weights",
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
    log_every: int = 10
    eval_every: int = 1000
    save_every: int = 1000
    keep_last: int = 3
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
        _check(self.engine in ("auto", "torch", "deepspeed"), f"{p}.engine",
               f"must be auto, torch or deepspeed, got {self.engine!r}")
        _check(self.wandb in ("auto", "online", "offline", "off"), f"{p}.wandb",
               f"must be auto, online, offline or off, got {self.wandb!r}")
        _check(self.exit_after_minutes >= 0, f"{p}.exit_after_minutes", "must be >= 0")
        _check(self.dist_timeout_minutes > 0, f"{p}.dist_timeout_minutes", "must be > 0")
        _check(self.lr_decay in ("constant", "cosine"), f"{p}.lr_decay",
               f"must be 'constant' or 'cosine', got {self.lr_decay!r}")
        _check(self.precision in ("auto", "bf16", "fp32"), f"{p}.precision",
               f"must be auto, bf16 or fp32, got {self.precision!r}")
        _check(self.zero_stage in (0, 1, 2, 3), f"{p}.zero_stage", f"must be 0..3, got {self.zero_stage}")
        for name in ("max_steps", "micro_batch_size", "grad_accum_steps", "log_every", "eval_every",
                     "save_every", "keep_last", "max_nonfinite_steps", "zero_bucket_elements",
                     "zero3_max_live_parameters", "divergence_window", "divergence_patience"):
            _check(getattr(self, name) >= 1, f"{p}.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(self.warmup_steps >= 0, f"{p}.warmup_steps", "must be >= 0")
        _check(self.divergence_warmup >= 1, f"{p}.divergence_warmup", "must be >= 1")
        _check(self.divergence_ratio == 0 or self.divergence_ratio > 1, f"{p}.divergence_ratio",
               f"must be 0 (off) or > 1, got {self.divergence_ratio}")
        _check(self.divergence_min_increase >= 0, f"{p}.divergence_min_increase", "must be >= 0")
        _check(self.divergence_grad_norm_ratio == 0 or self.divergence_grad_norm_ratio > 1,
               f"{p}.divergence_grad_norm_ratio", f"must be 0 (off) or > 1, got {self.divergence_grad_norm_ratio}")
        _check(self.lr > 0 and 0 <= self.min_lr <= self.lr, f"{p}.min_lr",
               f"need 0 <= min_lr <= lr and lr > 0 (lr={self.lr}, min_lr={self.min_lr})")


@dataclass
class EvalConfig:
    eval_set: Optional[str] = None  # JSONL with a "text" field (default: WikiText-103 test documents)
    text_field: str = "text"
    block_tokens: int = 2048  # evaluation block size in tokens (changes BrierLM; recorded with scores)
    max_blocks: int = 0  # 0 = all blocks
    batch_size: int = 1

    def validate(self, p: str) -> None:
        _check(self.block_tokens >= 2, f"{p}.block_tokens", "must be >= 2")
        _check(self.max_blocks >= 0, f"{p}.max_blocks", "must be >= 0")


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1

    def validate(self, p: str) -> None:
        _check(self.tensor >= 1, f"{p}.tensor", "must be >= 1")
        _check(self.pipeline >= 1, f"{p}.pipeline", "must be >= 1")


def validate_sections(cfg) -> None:
    """Call `validate(name)` on every dataclass field of `cfg` (the sections of a run or pipeline config)."""
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section):
            section.validate(f.name)


@dataclass
class RunConfig:
    name: str = "run"
    model: ModelConfig = field(default_factory=CALMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> "RunConfig":
        validate_sections(self)
        if self.parallel.pipeline > 1:
            _check(self.train.zero_stage in (0, 1), "train.zero_stage",
                   f"= {self.train.zero_stage} cannot go with parallel.pipeline = {self.parallel.pipeline}: "
                   "DeepSpeed's pipeline engine supports ZeRO stage 0 or 1; set train.zero_stage=1")
            _check(isinstance(self.model, BackboneConfig), "parallel.pipeline",
                   f"= {self.parallel.pipeline} needs a calm or transformer model, not {self.model.arch}")
            if isinstance(self.model, BackboneConfig):
                _check(self.model.num_layers >= self.parallel.pipeline, "parallel.pipeline",
                       f"= {self.parallel.pipeline} exceeds model.num_layers = {self.model.num_layers}")
        if self.parallel.tensor > 1:
            _check(self.train.zero_stage in (0, 1, 2), "train.zero_stage",
                   f"= 3 cannot go with parallel.tensor = {self.parallel.tensor}: tensor parallelism splits "
                   "the full weights, which ZeRO-3 never materialises; use train.zero_stage=1")
            _check(isinstance(self.model, BackboneConfig), "parallel.tensor",
                   f"= {self.parallel.tensor} needs a calm or transformer model, not {self.model.arch}")
        if isinstance(self.model, BackboneConfig) and self.parallel.tensor > 1:
            m = self.model
            _check(m.num_heads % self.parallel.tensor == 0 and m.num_kv_heads % self.parallel.tensor == 0,
                   "parallel.tensor", f"= {self.parallel.tensor} must divide model.num_heads "
                   f"({m.num_heads}) and model.num_kv_heads ({m.num_kv_heads})")
            _check(m.intermediate_size % self.parallel.tensor == 0, "parallel.tensor",
                   f"= {self.parallel.tensor} must divide model.intermediate_size ({m.intermediate_size})")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


# --------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks that name the key
# --------------------------------------------------------------------------------------------
def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if all(dataclasses.is_dataclass(a) for a in inner):  # the tagged `model` union
            return _build_model(value, key)
        return _coerce(value, inner[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return build_dataclass(tp, value, key)
    if tp in (list, typing.List) or origin in (list, typing.List):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return list(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads a bare off/on as a boolean
            return "on" if value else "off"
        if isinstance(value, (int, float)):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def build_dataclass(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for name in values:
        if name not in known:
            where = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"{where}: unknown key (known keys here: {', '.join(sorted(known))})")
    kwargs = {}
    for name, raw in values.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(raw, hints[name], key)
    return cls(**kwargs)


def _build_model(values: Any, key: str) -> Any:
    if dataclasses.is_dataclass(values):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"{key}: expected a mapping, got {values!r}")
    arch = values.get("arch", "calm")
    if arch not in MODEL_CONFIGS:
        raise ConfigError(f"{key}.arch: unknown architecture {arch!r}; known: {sorted(MODEL_CONFIGS)}")
    return build_dataclass(MODEL_CONFIGS[arch], values, key)


# --------------------------------------------------------------------------------------------
# Loading: YAML file(s) + dotted overrides
# --------------------------------------------------------------------------------------------
def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: is a value, not a section (while setting {dotted})")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-4"`` → ``("train.lr", 1e-4)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE (for example train.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from None
    return key, value


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
                      f"{' | '.join(sorted(MODEL_CONFIGS))}, in the YAML or as an override (model.arch=calm)")


def model_config_from_dict(values: dict) -> ModelConfig:
    """Build and validate only a model section (used for checkpoints and release imports)."""
    cfg = _build_model(dict(values), "model")
    cfg.validate("model")
    return cfg


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def config_fingerprint(section: Any) -> str:
    import hashlib

    blob = json.dumps(dataclasses.asdict(section), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
