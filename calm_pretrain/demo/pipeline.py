"""The main job's pipeline config (``configs/demo.yaml`` by default): the corpus, the tokenizer and one
ordinary ``calm-pretrain train`` config per model, with dotted overrides."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

# the run config's own section builder and override setter: the same checks and messages
from calm_pretrain.config import ConfigError, validate_sections
from calm_pretrain.schema import build_dataclass, parse_override, set_dotted

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PIPELINE = REPO / "configs" / "demo.yaml"
MODELS = ("ae", "calm", "transformer")


@dataclass
class CorpusSection:
    # "stdlib" (the Python standard library's docstrings + pydoc topics, no download), or inputs for
    # `calm-data tokenize`: jsonl / jsonl.zst / parquet / txt files, globs, or a hub dataset name
    inputs: Any = "stdlib"
    heldout: list = field(default_factory=list)  # held-out inputs (not stdlib); default: none → error
    heldout_fraction: float = 0.05  # stdlib: the last fraction of documents is held out
    text_field: str = "text"
    split: str = "train"  # hub datasets
    heldout_split: str = "test"
    subset: Optional[str] = None  # hub dataset configurations
    heldout_subset: Optional[str] = None
    max_documents: Optional[int] = None  # only the first N documents (stdlib: before the split; else each of
                                         # train and held-out); all when null

    def validate(self, p: str) -> None:
        if self.inputs != "stdlib":
            if isinstance(self.inputs, str):
                self.inputs = [self.inputs]
            if not isinstance(self.inputs, list) or not self.inputs:
                raise ConfigError(f"{p}.inputs: 'stdlib' or a non-empty list of inputs, got {self.inputs!r}")
            if not self.heldout:
                raise ConfigError(f"{p}.heldout: a corpus other than stdlib needs held-out inputs for evaluation")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError(f"{p}.heldout_fraction: must be in (0, 1), got {self.heldout_fraction}")
        if self.max_documents is not None and self.max_documents < 1:
            raise ConfigError(f"{p}.max_documents: must be >= 1 or null")


@dataclass
class TokenizerSection:
    spec: str = "train"  # train: a byte-level BPE trained here | demo | llama3[:DIR] | a directory | HF name
    vocab_size: int = 1024  # spec=train only

    def validate(self, p: str) -> None:
        if self.spec == "train" and self.vocab_size < 260:
            raise ConfigError(f"{p}.vocab_size: a byte-level BPE needs >= 260 (256 bytes + specials), "
                              f"got {self.vocab_size}")


@dataclass
class TokenizeSection:
    workers: int = 0  # calm-data tokenize -j (0: in its own process)

    def validate(self, p: str) -> None:
        if self.workers < 0:
            raise ConfigError(f"{p}.workers: must be >= 0")


@dataclass
class StageSection:
    config: str = ""  # a `calm-pretrain train` config (relative paths: to the repository)
    overrides: list = field(default_factory=list)  # dotted overrides of that config
    processes: int = 1  # 1: plain PyTorch; >1: torchrun --nproc_per_node N (DeepSpeed ZeRO, train.zero_stage)
    threads: Optional[int] = None  # OMP_NUM_THREADS per process (null: leave the environment's)

    def validate(self, p: str) -> None:
        if not self.config:
            raise ConfigError(f"{p}.config: a run config path is required")
        if self.processes < 1:
            raise ConfigError(f"{p}.processes: must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"{p}.threads: must be >= 1 or null")


@dataclass
class StagesSection:
    ae: StageSection = field(default_factory=lambda: StageSection("configs/demo/ae.yaml", processes=2, threads=1))
    calm: StageSection = field(default_factory=lambda: StageSection("configs/demo/calm.yaml", processes=2, threads=1))
    transformer: StageSection = field(
        default_factory=lambda: StageSection("configs/demo/transformer.yaml", processes=2, threads=1))

    def validate(self, p: str) -> None:
        for name in MODELS:
            getattr(self, name).validate(f"{p}.{name}")


@dataclass
class EncodeSection:
    processes: int = 1
    threads: Optional[int] = 1
    dtype: str = "bf16"

    def validate(self, p: str) -> None:
        from data_pipeline.latent_codec import LATENT_DTYPES

        if self.dtype not in LATENT_DTYPES:
            raise ConfigError(f"{p}.dtype: one of {', '.join(LATENT_DTYPES)}, got {self.dtype!r}")


@dataclass
class EvalSection:
    blocks: int = 32  # held-out blocks of eval.block_tokens (from the CALM stage config) for BrierLM; 0: all

    def validate(self, p: str) -> None:
        if self.blocks < 0:
            raise ConfigError(f"{p}.blocks: must be >= 0 (0: every held-out block)")


@dataclass
class GenerateSection:
    prompt: str = "The module provides"
    tokens: int = 48
    temperatures: list = field(default_factory=lambda: [1.0, 0.5])
    candidates: int = 64  # batch temperature sampling: candidates per step (CALM)
    seed: int = 0

    def validate(self, p: str) -> None:
        if not self.temperatures or not all(0 < float(t) <= 1 for t in self.temperatures):
            raise ConfigError(f"{p}.temperatures: values in (0, 1], got {self.temperatures!r}")


@dataclass
class PipelineConfig:
    name: str = "demo"
    corpus: CorpusSection = field(default_factory=CorpusSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    tokenize: TokenizeSection = field(default_factory=TokenizeSection)
    stages: StagesSection = field(default_factory=StagesSection)
    encode: EncodeSection = field(default_factory=EncodeSection)
    eval: EvalSection = field(default_factory=EvalSection)
    generate: GenerateSection = field(default_factory=GenerateSection)

    def validate(self) -> "PipelineConfig":
        validate_sections(self)
        return self


def load_pipeline(path: Optional[str | Path] = None, overrides=()) -> PipelineConfig:
    """The pipeline config from YAML (default ``configs/demo.yaml``) and dotted overrides. An override
    whose first key is a model stage and whose second is not a stage field is a run-config override of
    that stage: ``calm.train.max_steps=100`` → ``stages.calm.overrides += ["train.max_steps=100"]``."""
    path = Path(path) if path else DEFAULT_PIPELINE
    if not path.is_file():
        raise ConfigError(f"pipeline config not found: {path}")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    stage_fields = {f.name for f in dataclasses.fields(StageSection)}
    for text in overrides:
        key, value = parse_override(text)
        first, _, rest = key.partition(".")
        if first in MODELS and rest.split(".")[0] not in stage_fields:
            stage = tree.setdefault("stages", {}).setdefault(first, {})
            stage["overrides"] = list(stage.get("overrides") or []) + [text.split(".", 1)[1]]
        else:
            set_dotted(tree, key, value)
    try:
        return build_dataclass(PipelineConfig, tree, "").validate()
    except ConfigError as e:
        raise ConfigError(f"{e} (in {path})") from None


def repo_path(p: str) -> Path:
    path = Path(p)
    return path if path.is_absolute() or path.exists() else REPO / path
