"""The main job: raw English text → tokenizer → autoencoder → latent shards → CALM and a Transformer
baseline → BrierLM, samples, release checkpoints, reloaded for one generation.

A pipeline config (``configs/demo.yaml`` by default) names the corpus, the tokenizer and one ordinary
``calm-pretrain train`` config per model. Each stage runs the project's own commands as subprocesses
(``calm-data demo-tokenizer / tokenize / encode``, ``calm-pretrain train`` — under torchrun when a stage
asks for several processes — and ``calm-pretrain export``), with the resolved run config written to
``<run-dir>/configs/<stage>.yaml`` first, so the demo exercises exactly what a real run uses.

Every stage leaves ``<stage>.done.json`` with its numbers (and a key of the settings it ran with) last;
a re-run skips finished stages, and refuses a run directory whose finished stages were made with other
settings. The run directory ends up holding ``summary.json`` (the table printed at the end), each model's
``metrics.jsonl``, ``plots/training.png``, ``release/{ae,calm,transformer}``, ``samples.json`` and
``eval.json``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from calm_pretrain.config import (ConfigError, RunConfig, _build, _set_dotted, dump_config, load_config,
                                  parse_override, validate_sections)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PIPELINE = REPO / "configs" / "demo.yaml"
MODELS = ("ae", "calm", "transformer")


# --------------------------------------------------------------------------------------------
# The pipeline config
# --------------------------------------------------------------------------------------------
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
        if self.dtype not in ("bf16", "int8"):
            raise ConfigError(f"{p}.dtype: bf16 or int8, got {self.dtype!r}")


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
            _set_dotted(tree, key, value)
    try:
        return _build(PipelineConfig, tree, "").validate()
    except ConfigError as e:
        raise ConfigError(f"{e} (in {path})") from None


def _repo_path(p: str) -> Path:
    path = Path(p)
    return path if path.is_absolute() or path.exists() else REPO / path


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------
class SettingsChanged(RuntimeError):
    """A finished stage in the run directory was made with other settings."""


class Stages:
    """Runs named stages once; a finished stage leaves `<name>.done.json` with its summary.

    Each stage has a key: a hash of its own settings chained with the previous stage's key, so a change
    anywhere invalidates that stage and every later one. A marker with another key stops the run."""

    def __init__(self, run_dir: Path, log: Callable[[str], None] = print):
        self.run_dir, self.log = run_dir, log
        self.summary: list[dict] = []
        self.key = ""

    def run(self, name: str, fn: Callable[[], dict], settings: Any = None) -> dict:
        self.key = hashlib.sha256(json.dumps([self.key, name, settings], sort_keys=True, default=str)
                                  .encode()).hexdigest()[:16]
        marker = self.run_dir / f"{name}.done.json"
        if marker.is_file():
            result = json.loads(marker.read_text())
            if result.get("key") != self.key:
                raise SettingsChanged(
                    f"{marker}: stage {name!r} finished with other settings than this run's (a changed pipeline "
                    f"config, override or --steps-scale); use a new --run-dir, or delete {name}.done.json and the "
                    f"later stages' markers and outputs to redo them")
            self.log(f"== {name}: done before, reusing ({result.get('metric', '')})")
        else:
            self.log(f"== {name}")
            t0 = time.perf_counter()
            result = fn()
            result["seconds"] = round(time.perf_counter() - t0, 1)
            result["key"] = self.key
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1))
            tmp.replace(marker)
        self.summary.append({"stage": name, **result})
        return result

    def result(self, name: str) -> dict:
        """The result of a stage run (or reused) earlier in this run."""
        return next(r for r in self.summary if r["stage"] == name)


class CommandFailed(RuntimeError):
    pass


def run_command(argv: list[str], log_file: Path, log: Callable[[str], None], *, processes: int = 1,
                threads: Optional[int] = None, echo: Callable[[str], bool] = lambda line: True) -> None:
    """Run `python -m <argv>` (under torchrun with `processes` > 1), output to `log_file`; lines for
    which `echo` is true are also logged. A non-zero exit raises with the log's tail."""
    import torch

    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", *argv]
    else:
        cmd = [sys.executable, "-m", *argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    tail: list[str] = []
    with log_file.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=REPO)
        for line in proc.stdout:
            out.write(line)
            tail = (tail + [line.rstrip()])[-30:]
            if echo(line):
                log("  " + line.rstrip())
        code = proc.wait()
    if code != 0:
        raise CommandFailed(f"{' '.join(cmd)} exited with {code} (log: {log_file}); last lines:\n" + "\n".join(tail))


def run_commands(jobs: list[tuple[list[str], Path]], log: Callable[[str], None], **kw) -> None:
    """`run_command` for independent jobs at once (each is mostly interpreter start-up and imports)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(jobs)) as pool:
        for future in [pool.submit(run_command, argv, log_file, log, **kw) for argv, log_file in jobs]:
            future.result()


def _trainer_lines(name: str, every: int = 50) -> Callable[[str], bool]:
    """The trainer's own lines, its step lines only every `every` steps and at the last."""
    import re

    def echo(line: str) -> bool:
        if "Error" in line:
            return True
        if not line.startswith(f"[{name}]"):
            return False
        m = re.search(r"\bstep (\d+)/(\d+) ", line)
        return m is None or int(m.group(1)) % every == 0 or m.group(1) == m.group(2)
    return echo


def _exported(line: str) -> bool:
    return line.startswith("exported")


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def load_trained(run_dir: Path):
    """A model from a training run's newest checkpoint (consolidated from any ZeRO stage), eval mode."""
    import contextlib
    import io

    from calm_pretrain.train.checkpoint import trained_model

    chatter = io.StringIO()  # DeepSpeed's consolidation prints its progress
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        return trained_model(run_dir)


def _settings(stage: StageSection, cfg: RunConfig) -> dict:
    """What decides a training stage's result, as the user wrote it: the config file's text, the
    overrides, the steps and the process count (the resolved config also holds every default, which a
    newer version of this code may extend without changing the run)."""
    text = _repo_path(stage.config).read_text()
    return {"config": hashlib.sha256(text.encode()).hexdigest(), "overrides": stage.overrides,
            "max_steps": cfg.train.max_steps, "processes": stage.processes}


def _sample(model, ae, prompt, gen_cfg: GenerateSection, temperature: float, seed: int) -> list[int]:
    import torch

    from calm_pretrain.sampling import generate_calm, generate_transformer

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if ae is not None:
            ids = generate_calm(model, ae, prompt, gen_cfg.tokens, temperature=temperature,
                                num_candidates=gen_cfg.candidates, generator=gen)
        else:
            ids = generate_transformer(model, prompt, gen_cfg.tokens, temperature=temperature, generator=gen)
    return ids.tolist()


def plot_training(run: Path, out: Path) -> Path:
    """One PNG: the training loss of each model (and the autoencoder's batch accuracy) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    titles = {"ae": "autoencoder: loss (CE·K + β·KL)", "calm": "CALM: energy loss", "transformer": "Transformer: CE"}
    for ax, name in zip(axes, MODELS):
        rows = read_metrics(run / name)
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="C0")
        ax.set_title(titles[name])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if name == "ae":
            acc = ax.twinx()
            acc.plot([r["step"] for r in rows], [r["accuracy"] for r in rows], color="C1")
            acc.set_ylabel("batch accuracy", color="C1")
            acc.set_ylim(0, 1)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def run_demo(run_dir: str | Path = "runs/demo", config: Optional[str | Path] = None, overrides=(),
             steps_scale: float = 1.0, log: Callable[[str], None] = print) -> list[dict]:
    """Run (or finish) the main job in `run_dir`; returns the summary rows (also in summary.json)."""
    import torch

    from calm_pretrain.flops import training_flops_per_token
    from calm_pretrain.models import count_config_parameters

    pipe = load_pipeline(config, overrides)
    run = Path(run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    (run / "configs").mkdir(exist_ok=True)
    data, release = run / "data", run / "release"
    cfgs: dict[str, RunConfig] = {}
    for name in MODELS:
        stage = getattr(pipe.stages, name)
        base = load_config(_repo_path(stage.config), stage.overrides)
        steps = max(2, int(round(base.train.max_steps * steps_scale)))
        cfgs[name] = load_config(_repo_path(stage.config), [*stage.overrides, f"train.max_steps={steps}"])
    ae_cfg, calm_cfg, tr_cfg = cfgs["ae"], cfgs["calm"], cfgs["transformer"]
    k = ae_cfg.model.k
    if calm_cfg.model.k != k or calm_cfg.model.latent_dim != ae_cfg.model.latent_dim:
        raise ConfigError(f"the CALM config has K={calm_cfg.model.k}, latent {calm_cfg.model.latent_dim}; the "
                          f"autoencoder K={k}, latent {ae_cfg.model.latent_dim}")
    block_tokens = calm_cfg.eval.block_tokens
    if block_tokens % k:
        raise ConfigError(f"eval.block_tokens = {block_tokens} of the CALM config is not a multiple of K = {k}")
    (run / "pipeline.yaml").write_text(yaml.safe_dump(dataclasses.asdict(pipe), sort_keys=False))
    stages = Stages(run, log)
    tok_spec = str(run / "tokenizer") if pipe.tokenizer.spec == "train" else pipe.tokenizer.spec
    c = pipe.corpus
    stdlib = c.inputs == "stdlib"
    train_inputs = [str(run / "corpus" / "train.jsonl")] if stdlib else list(c.inputs)
    heldout_inputs = [str(run / "corpus" / "heldout.jsonl")] if stdlib else list(c.heldout)
    lm_sample = calm_cfg.data.seq_chunks * k
    tr_shards = "lm_tokens" if tr_cfg.data.seq_chunks == lm_sample else "tr_tokens"
    tr_heldout = "heldout" if tr_cfg.eval.block_tokens == block_tokens else "heldout_tr"

    def corpus():
        if not stdlib:
            return {"inputs": c.inputs, "heldout": c.heldout,
                    "metric": f"{', '.join(c.inputs)} (held out: {', '.join(c.heldout)})"}
        from data_pipeline.tokenizers import stdlib_corpus

        docs = stdlib_corpus(c.max_documents)
        split = int(round(len(docs) * (1 - c.heldout_fraction)))
        parts = {"train": docs[:split], "heldout": docs[split:]}
        (run / "corpus").mkdir(exist_ok=True)
        for name, part in parts.items():
            with (run / "corpus" / f"{name}.jsonl").open("w") as f:
                f.writelines(json.dumps({"text": t}) + "\n" for t in part)
        n = {name: len(part) for name, part in parts.items()}
        chars = sum(len(t) for part in parts.values() for t in part)
        return {"documents": n["train"], "heldout_documents": n["heldout"], "characters": chars,
                "metric": f"stdlib docs: {n['train']:,} training + {n['heldout']:,} held-out documents, "
                          f"{chars / 1e6:.1f}M chars"}

    def tokenizer():
        if pipe.tokenizer.spec == "train":
            run_command(["data_pipeline.cli", "demo-tokenizer", tok_spec, "--vocab-size", str(pipe.tokenizer.vocab_size),
                         "--corpus", *train_inputs, "--text-field", c.text_field], run / "logs" / "tokenizer.log", log)
        from data_pipeline.tokenizers import load_tokenizer

        tok = load_tokenizer(tok_spec)
        for name, cfg in cfgs.items():
            if cfg.model.vocab_size < tok.vocab_size:
                raise ConfigError(f"{name}: model.vocab_size = {cfg.model.vocab_size} < the tokenizer's "
                                  f"{tok.vocab_size}")
        what = f"byte-level BPE trained here, vocab {tok.vocab_size}" if pipe.tokenizer.spec == "train" \
            else f"{pipe.tokenizer.spec}, vocab {tok.vocab_size}"
        return {"vocab_size": tok.vocab_size, "fingerprint": tok.fingerprint, "metric": what}

    def tokenize():
        train_src, held_src = (train_inputs, c.split, c.subset), (heldout_inputs, c.heldout_split, c.heldout_subset)
        jobs = {"ae_tokens": (train_src, "ae", k, ae_cfg.data.seq_chunks),
                "lm_tokens": (train_src, "lm", k, calm_cfg.data.seq_chunks),
                "heldout": (held_src, "lm", k, block_tokens // k)}
        if tr_shards == "tr_tokens":
            jobs["tr_tokens"] = (train_src, "lm", 1, tr_cfg.data.seq_chunks)
        if tr_heldout == "heldout_tr":
            jobs["heldout_tr"] = (held_src, "lm", 1, tr_cfg.eval.block_tokens)
        from data_pipeline.manifest import load_manifest

        commands = []
        for name, ((inputs, split, subset), layout, kk, seq_chunks) in jobs.items():
            argv = ["data_pipeline.cli", "tokenize", *inputs, "-o", str(data / name), "--tokenizer", tok_spec,
                    "--layout", layout, "--k", str(kk), "--seq-chunks", str(seq_chunks), "-j",
                    str(pipe.tokenize.workers), "--text-field", c.text_field, "--split", split, "--no-progress"]
            if subset:
                argv += ["--subset", subset]
            if c.max_documents and not stdlib:
                argv += ["--max-documents", str(c.max_documents)]
            commands.append((argv, run / "logs" / f"tokenize_{name}.log"))
        run_commands(commands, log)
        out = {name: load_manifest(data / name).num_tokens for name in jobs}
        return {**out, "metric": f"{out['lm_tokens']:,} training tokens, {out['heldout']:,} held-out"}

    def train(name: str, shards: str, eval_shards: str) -> Callable[[], dict]:
        stage, cfg = getattr(pipe.stages, name), cfgs[name]

        def fn():
            cfg.data.train = [str(data / shards)]
            cfg.data.eval = str(data / eval_shards)  # held-out: AE accuracy / BrierLM in metrics.jsonl
            cfg.train.output_dir = str(run / name)
            if name == "calm":  # the loader checks the latents came from it; BrierLM decodes with it
                cfg.model.ae_path = str(release / "ae")
            path = run / "configs" / f"{name}.yaml"
            path.write_text(dump_config(cfg.validate()))
            if not list((run / name / "checkpoints").glob("step_*")):  # nothing to resume: start clean, so
                (run / name / "metrics.jsonl").unlink(missing_ok=True)  # a cut-off run's lines do not stay
            run_command(["calm_pretrain.cli", "train", "--config", str(path)], run / "logs" / f"{name}.log", log,
                        processes=stage.processes, threads=stage.threads, echo=_trainer_lines(cfg.name))
            rows = read_metrics(run / name)
            t = cfg.train
            sample_tokens = cfg.data.seq_chunks * getattr(cfg.model, "k", 1)
            tokens = rows[-1]["step"] * t.micro_batch_size * t.grad_accum_steps * stage.processes * sample_tokens
            flops = training_flops_per_token(cfg.model, cfg.data.seq_chunks).total * tokens
            first, last = rows[0]["loss"], rows[-1]["loss"]  # the first and last logged steps
            n_params = count_config_parameters(cfg.model)["total"]  # no need to load the checkpoint
            return {"params": n_params, "steps": rows[-1]["step"], "loss_first": first, "loss_last": last,
                    "train_tokens": tokens, "train_flops": flops, "processes": stage.processes,
                    "eval": {key: v for key, v in rows[-1].items() if key.startswith("eval/")}}
        return fn

    def autoencoder():
        result = train("ae", "ae_tokens", "heldout")()
        # The release is the autoencoder from here on: it encodes the data, CALM's ae_path names it.
        run_command(["calm_pretrain.cli", "export", "--checkpoint", str(run / "ae"), "--out", str(release / "ae"),
                     "--tokenizer", tok_spec], run / "logs" / "export_ae.log", log, echo=_exported)
        acc, noisy = result["eval"]["eval/accuracy"], result["eval"]["eval/accuracy_noise_0.3"]
        result.update(accuracy=acc, accuracy_noise_0_3=noisy,
                      metric=f"{result['steps']} steps, {result['params'] / 1e6:.2f}M params; held-out reconstruction "
                             f"{100 * acc:.2f}% (σ = 0.3 latent noise: {100 * noisy:.2f}%)")
        return result

    def encode():
        from data_pipeline.manifest import load_manifest

        e = pipe.encode
        run_command(["data_pipeline.cli", "encode", str(data / "lm_tokens"), "--ae", str(release / "ae"), "-o",
                     str(data / "latents"), "--dtype", e.dtype, "--no-progress"], run / "logs" / "encode.log", log,
                    processes=e.processes, threads=e.threads)
        m = load_manifest(data / "latents")
        bpt = m.num_bytes / m.num_tokens
        return {"samples": m.num_samples, "tokens": m.num_tokens, "bytes_per_token": bpt,
                "metric": f"{m.num_samples:,} samples of {lm_sample} tokens, {bpt:.1f} bytes/token "
                          f"({e.dtype}, d = {ae_cfg.model.latent_dim})"}

    def lm_stage(name: str, shards: str) -> Callable[[], dict]:
        def fn():
            result = train(name, shards, "heldout" if name == "calm" else tr_heldout)()
            stage = getattr(pipe.stages, name)
            engine = f"ZeRO-{cfgs[name].train.zero_stage} × {stage.processes}" if stage.processes > 1 else "1 process"
            result["metric"] = (f"{result['steps']} steps ({engine}), {result['params'] / 1e6:.2f}M params, "
                                f"{result['train_flops'] / 1e12:.1f} TFLOP; loss {result['loss_first']:.2f} → "
                                f"{result['loss_last']:.2f}")
            return result
        return fn

    def evaluate():
        from calm_pretrain.eval.heldout import evaluate_model
        from calm_pretrain.eval.source import heldout_blocks
        from data_pipeline.ae_io import load_autoencoder

        ae = load_autoencoder(release / "ae")
        blocks = heldout_blocks(data / "heldout", pipe.eval.blocks, batch=8)
        tr_blocks = blocks if tr_heldout == "heldout" else heldout_blocks(data / tr_heldout, pipe.eval.blocks, batch=8)
        calm = evaluate_model(load_trained(run / "calm"), blocks, ae=ae)
        tr = evaluate_model(load_trained(run / "transformer"), tr_blocks)
        (run / "eval.json").write_text(json.dumps({"calm": calm, "transformer": tr}, indent=1))
        n = sum(b.numel() for b in blocks)
        flops = {name: stages.result(name).get("train_flops") for name in ("calm", "transformer")}
        return {"calm": calm["brierlm"], "transformer": tr["brierlm"], "heldout_tokens": n,
                "calm_brier_n": [calm[f"brier_{i}"] for i in range(1, 5)],
                "transformer_brier_n": [tr[f"brier_{i}"] for i in range(1, 5)],
                "calm_energy_skill": calm["energy_skill"], "calm_energy_skill_se": calm["energy_skill_se"],
                "train_flops": flops, "table": results_table(calm, tr, flops),
                "metric": f"BrierLM CALM {calm['brierlm']:.2f}, Transformer {tr['brierlm']:.2f}; CALM energy skill "
                          f"{calm['energy_skill']:+.4f} ± {calm['energy_skill_se']:.4f} "
                          f"({calm['energy_skill'] / calm['energy_skill_se']:+.1f} standard errors) on {n:,} "
                          "held-out tokens (table below)"}

    def generate():
        from data_pipeline.ae_io import load_autoencoder
        from data_pipeline.tokenizers import load_tokenizer

        g = pipe.generate
        tok = load_tokenizer(tok_spec)
        ae = load_autoencoder(release / "ae")
        models = {"calm": (load_trained(run / "calm"), ae), "transformer": (load_trained(run / "transformer"), None)}
        prompt = torch.tensor(tok.encode(g.prompt), dtype=torch.long)
        samples = {}
        for temp in g.temperatures:
            label = f"T={temp:g}" if temp == 1 or 1 / temp % 1 else f"T=1/{1 / temp:g}"
            for name, (model, model_ae) in models.items():
                ids = _sample(model, model_ae, prompt, g, float(temp), g.seed)
                samples[f"{name} {label}"] = tok.decode(ids)  # the prompt included
        (run / "samples.json").write_text(json.dumps(samples, indent=1))
        for name, text in samples.items():
            log(f"  [{name}] {text!r}")
        return {"samples": samples, "metric": f"{len(samples)} samples ({', '.join(samples)}) in samples.json"}

    def export_and_reload():
        from calm_pretrain.release import import_release, import_release_ae
        from data_pipeline.ae_io import load_autoencoder
        from data_pipeline.tokenizers import load_tokenizer

        run_commands([(["calm_pretrain.cli", "export", "--checkpoint", str(run / "calm"), "--out", str(release / "calm"),
                        "--tokenizer", tok_spec, "--embed-ae", str(release / "ae")], run / "logs" / "export_calm.log"),
                      (["calm_pretrain.cli", "export", "--checkpoint", str(run / "transformer"), "--out",
                        str(release / "transformer"), "--tokenizer", tok_spec], run / "logs" / "export_transformer.log")],
                     log, echo=_exported)
        g, temp = pipe.generate, float(pipe.generate.temperatures[0])
        trained_ae = load_autoencoder(release / "ae")
        checks = {}
        for name in ("calm", "transformer"):
            model, _ = import_release(release / name)
            ae = import_release_ae(release / name)[0] if name == "calm" else None
            tok = load_tokenizer(str(release / name))  # the tokenizer files saved with the release
            prompt = torch.tensor(tok.encode(g.prompt), dtype=torch.long)
            reloaded = _sample(model, ae, prompt, g, temp, g.seed)
            trained = _sample(load_trained(run / name), trained_ae if name == "calm" else None, prompt, g, temp, g.seed)
            if reloaded != trained:
                raise RuntimeError(f"release/{name}: the reloaded release generates {reloaded} but the trained "
                                   f"model {trained} (same prompt, seed and temperature)")
            checks[name] = {"text": tok.decode(reloaded), "identical_to_trained": True}
            log(f"  [{name} release, T={temp:g}] {checks[name]['text']!r}")
        sizes = {name: sum(f.stat().st_size for f in (release / name).rglob("*") if f.is_file()) for name in MODELS}
        return {"releases": {n: str(release / n) for n in MODELS}, "bytes": sizes, "reloaded": checks,
                "metric": f"release/{{ae,calm,transformer}} ({sum(sizes.values()) / 1e6:.1f} MB); reloaded CALM "
                          f"(embedded AE) and Transformer generate the trained models' samples exactly"}

    def plots():
        out = plot_training(run, run / "plots" / "training.png")
        return {"png": str(out), "metric": f"{out.relative_to(run)}"}

    stages.run("corpus", corpus, dataclasses.asdict(c))
    stages.run("tokenizer", tokenizer, dataclasses.asdict(pipe.tokenizer))
    stages.run("tokenize", tokenize, [ae_cfg.data.seq_chunks, calm_cfg.data.seq_chunks, tr_cfg.data.seq_chunks,
                                      block_tokens, tr_cfg.eval.block_tokens, k])
    stages.run("autoencoder", autoencoder, _settings(pipe.stages.ae, ae_cfg))
    stages.run("encode", encode, pipe.encode.dtype)
    stages.run("calm", lm_stage("calm", "latents"), _settings(pipe.stages.calm, calm_cfg))
    stages.run("transformer", lm_stage("transformer", tr_shards), _settings(pipe.stages.transformer, tr_cfg))
    stages.run("evaluate", evaluate, dataclasses.asdict(pipe.eval))
    stages.run("generate", generate, dataclasses.asdict(pipe.generate))
    stages.run("release", export_and_reload)
    stages.run("plots", plots)

    total = round(sum(r.get("seconds", 0.0) for r in stages.summary), 1)
    log("\n" + format_summary(stages.summary))
    (run / "summary.json").write_text(json.dumps({"stages": stages.summary, "total_seconds": total}, indent=1))
    (run / "summary.txt").write_text(format_summary(stages.summary) + "\n")
    return stages.summary


def results_table(calm: dict, tr: dict, flops: dict) -> str:
    """CALM and the Transformer side by side: training compute, BrierLM, Brier-1..4 (± standard error)
    and CALM's energy skill, the score that shows whether it uses its context before BrierLM moves."""
    def pm(s: dict, key: str) -> str:
        se = s[key + "_se"]  # enough decimals for two significant digits of the standard error
        d = 4 if not 0 < se < 1e-4 else min(7, 1 - math.floor(math.log10(se)))
        return f"{s[key]:+.{d}f} ± {se:.{d}f}"
    head = ["model", "train TFLOP", "BrierLM", *(f"Brier-{n}" for n in range(1, 5)), "energy skill"]
    rows = [[name, f"{flops[key] / 1e12:.1f}" if flops.get(key) else "?", f"{s['brierlm']:.2f}",
             *(pm(s, f"brier_{n}") for n in range(1, 5)), pm(s, "energy_skill") if "energy_skill" in s else "n/a"]
            for name, key, s in (("CALM", "calm", calm), ("Transformer", "transformer", tr))]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [head, *rows])


def format_summary(rows: list[dict]) -> str:
    width = max(len(r["stage"]) for r in rows + [{"stage": "total"}])
    lines = [f"{'stage':<{width}}  {'time':>8}  key metric", "-" * (width + 100)]
    for r in rows:
        lines.append(f"{r['stage']:<{width}}  {r.get('seconds', 0):>7.1f}s  {r.get('metric', '')}")
    lines.append("-" * (width + 100))
    lines.append(f"{'total':<{width}}  {sum(r.get('seconds', 0) for r in rows):>7.1f}s  "
                 f"(stages run now and, for reused ones, when they ran)")
    for r in rows:
        if r.get("table"):
            lines += ["", "held-out results at the same training compute (± one standard error):", r["table"]]
    return "\n".join(lines)
