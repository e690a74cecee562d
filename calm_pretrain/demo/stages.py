"""The main job's in-process work: the context every stage reads (DemoContext), and for each stage what it
does besides the project's commands (graph.py lists those): a config written before them, and its result
row after them, read from what they made (its numbers and a one-line `metric` for the summary)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import yaml

from calm_pretrain.config import ConfigError, RunConfig, dump_config, load_config
from calm_pretrain.demo.pipeline import MODELS, GenerateSection, PipelineConfig, StageSection, load_pipeline, repo_path
from calm_pretrain.demo.report import plot_training, read_metrics, results_table
from calm_pretrain.workflow import LocalRunner


@dataclass
class DemoContext:
    """What every stage reads: one run of the main job in `run`."""
    pipe: PipelineConfig
    run: Path  # the run directory
    cfgs: dict[str, RunConfig]  # the run config of each model stage (MODELS), steps scaled
    log: Callable[[str], None]
    runner: LocalRunner  # runs the stages; holds the results of those run so far
    tok_spec: str  # the tokenizer: the one trained into the run directory, or the pipeline's spec
    train_inputs: list[str]  # the corpus: calm-data tokenize inputs
    heldout_inputs: list[str]
    tr_shards: str  # the Transformer's training shards: lm_tokens when its samples are CALM's, else its own
    tr_heldout: str  # its held-out shards: heldout when its blocks are CALM's, else its own

    @property
    def data(self) -> Path:
        return self.run / "data"

    @property
    def release(self) -> Path:
        return self.run / "release"

    @property
    def stdlib(self) -> bool:
        return self.pipe.corpus.inputs == "stdlib"

    @property
    def k(self) -> int:
        return self.cfgs["ae"].model.k

    @property
    def block_tokens(self) -> int:
        return self.cfgs["calm"].eval.block_tokens


def prepare(run_dir: str | Path, config: Optional[str | Path], overrides, steps_scale: float,
            log: Callable[[str], None]) -> DemoContext:
    """The pipeline and run configs checked against each other, the run directory made (pipeline.yaml)."""
    pipe = load_pipeline(config, overrides)
    run = Path(run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    (run / "configs").mkdir(exist_ok=True)
    cfgs: dict[str, RunConfig] = {}
    for name in MODELS:
        stage = getattr(pipe.stages, name)
        base = load_config(repo_path(stage.config), stage.overrides)
        steps = max(2, int(round(base.train.max_steps * steps_scale)))
        cfgs[name] = load_config(repo_path(stage.config), [*stage.overrides, f"train.max_steps={steps}"])
    ae_cfg, calm_cfg, tr_cfg = cfgs["ae"], cfgs["calm"], cfgs["transformer"]
    k = ae_cfg.model.k
    if calm_cfg.model.k != k or calm_cfg.model.latent_dim != ae_cfg.model.latent_dim:
        raise ConfigError(f"the CALM config has K={calm_cfg.model.k}, latent {calm_cfg.model.latent_dim}; the "
                          f"autoencoder K={k}, latent {ae_cfg.model.latent_dim}")
    block_tokens = calm_cfg.eval.block_tokens
    if block_tokens % k:
        raise ConfigError(f"eval.block_tokens = {block_tokens} of the CALM config is not a multiple of K = {k}")
    (run / "pipeline.yaml").write_text(yaml.safe_dump(dataclasses.asdict(pipe), sort_keys=False))
    c = pipe.corpus
    stdlib = c.inputs == "stdlib"
    return DemoContext(
        pipe=pipe, run=run, cfgs=cfgs, log=log,
        runner=LocalRunner(run, log, cause="a changed pipeline config, override or --steps-scale",
                           new_dir="a new --run-dir"),
        tok_spec=str(run / "tokenizer") if pipe.tokenizer.spec == "train" else pipe.tokenizer.spec,
        train_inputs=[str(run / "corpus" / "train.jsonl")] if stdlib else list(c.inputs),
        heldout_inputs=[str(run / "corpus" / "heldout.jsonl")] if stdlib else list(c.heldout),
        tr_shards="lm_tokens" if tr_cfg.data.seq_chunks == calm_cfg.data.seq_chunks * k else "tr_tokens",
        tr_heldout="heldout" if tr_cfg.eval.block_tokens == block_tokens else "heldout_tr")


def training_settings(ctx: DemoContext, name: str) -> dict:
    """What decides a training stage's result, as the user wrote it: the config file's text, the
    overrides, the steps and the process count (the resolved config also holds every default, which a
    newer version of this code may extend without changing the run)."""
    stage: StageSection = getattr(ctx.pipe.stages, name)
    text = repo_path(stage.config).read_text()
    return {"config": hashlib.sha256(text.encode()).hexdigest(), "overrides": stage.overrides,
            "max_steps": ctx.cfgs[name].train.max_steps, "processes": stage.processes}


def load_trained(run_dir: Path):
    """A model from a training run's newest checkpoint (consolidated from any ZeRO stage), eval mode."""
    from calm_pretrain.train.checkpoint import trained_model

    return trained_model(run_dir)


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


# --------------------------------------------------------------------------------------------
# The stages, in the order run_demo runs them
# --------------------------------------------------------------------------------------------
def corpus(ctx: DemoContext) -> dict:
    c, run = ctx.pipe.corpus, ctx.run
    if not ctx.stdlib:
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


def tokenizer(ctx: DemoContext) -> dict:
    """After `calm-data demo-tokenizer` (spec: train): the tokenizer fits every model's vocabulary."""
    from data_pipeline.tokenizers import load_tokenizer

    pipe = ctx.pipe
    tok = load_tokenizer(ctx.tok_spec)
    for name, cfg in ctx.cfgs.items():
        if cfg.model.vocab_size < tok.vocab_size:
            raise ConfigError(f"{name}: model.vocab_size = {cfg.model.vocab_size} < the tokenizer's "
                              f"{tok.vocab_size}")
    what = f"byte-level BPE trained here, vocab {tok.vocab_size}" if pipe.tokenizer.spec == "train" \
        else f"{pipe.tokenizer.spec}, vocab {tok.vocab_size}"
    return {"vocab_size": tok.vocab_size, "fingerprint": tok.fingerprint, "metric": what}


def tokenize_settings(ctx: DemoContext) -> list:
    cfgs = ctx.cfgs
    return [cfgs["ae"].data.seq_chunks, cfgs["calm"].data.seq_chunks, cfgs["transformer"].data.seq_chunks,
            ctx.block_tokens, cfgs["transformer"].eval.block_tokens, ctx.k]


def tokenize_jobs(ctx: DemoContext) -> dict[str, list[str]]:
    """The `calm-data tokenize` argv of every token shard directory under data/ the models read."""
    c, k, data, cfgs = ctx.pipe.corpus, ctx.k, ctx.data, ctx.cfgs
    train_src, held_src = (ctx.train_inputs, c.split, c.subset), (ctx.heldout_inputs, c.heldout_split, c.heldout_subset)
    jobs = {"ae_tokens": (train_src, "ae", k, cfgs["ae"].data.seq_chunks),
            "lm_tokens": (train_src, "lm", k, cfgs["calm"].data.seq_chunks),
            "heldout": (held_src, "lm", k, ctx.block_tokens // k)}
    if ctx.tr_shards == "tr_tokens":
        jobs["tr_tokens"] = (train_src, "lm", 1, cfgs["transformer"].data.seq_chunks)
    if ctx.tr_heldout == "heldout_tr":
        jobs["heldout_tr"] = (held_src, "lm", 1, cfgs["transformer"].eval.block_tokens)
    argvs = {}
    for name, ((inputs, split, subset), layout, kk, seq_chunks) in jobs.items():
        argv = ["data_pipeline.cli", "tokenize", *inputs, "-o", str(data / name), "--tokenizer", ctx.tok_spec,
                "--layout", layout, "--k", str(kk), "--seq-chunks", str(seq_chunks), "-j",
                str(ctx.pipe.tokenize.workers), "--text-field", c.text_field, "--split", split, "--no-progress"]
        if subset:
            argv += ["--subset", subset]
        if c.max_documents and not ctx.stdlib:
            argv += ["--max-documents", str(c.max_documents)]
        argvs[name] = argv
    return argvs


def tokenize(ctx: DemoContext) -> dict:
    from data_pipeline.manifest import load_manifest

    out = {name: load_manifest(ctx.data / name).num_tokens for name in tokenize_jobs(ctx)}
    return {**out, "metric": f"{out['lm_tokens']:,} training tokens, {out['heldout']:,} held-out"}


def write_train_config(ctx: DemoContext, name: str, shards: str, eval_shards: str) -> None:
    """Before a model's `calm-pretrain train`: its run config, on `shards`, evaluated on `eval_shards`,
    written to configs/<name>.yaml (the command's --config)."""
    cfg, run = ctx.cfgs[name], ctx.run
    cfg.data.train = [str(ctx.data / shards)]
    cfg.data.eval = str(ctx.data / eval_shards)  # held-out: AE accuracy / BrierLM in metrics.jsonl
    cfg.train.output_dir = str(run / name)
    if name == "calm":  # the loader checks the latents came from it; BrierLM decodes with it
        cfg.model.ae_path = str(ctx.release / "ae")
    (run / "configs" / f"{name}.yaml").write_text(dump_config(cfg.validate()))
    if not list((run / name / "checkpoints").glob("step_*")):  # nothing to resume: start clean, so
        (run / name / "metrics.jsonl").unlink(missing_ok=True)  # a cut-off run's lines do not stay


def trained(ctx: DemoContext, name: str) -> dict:
    """After a model's training: the numbers its metrics.jsonl and config give (the result rows of the
    autoencoder, CALM and Transformer stages start from this one)."""
    from calm_pretrain.models.registry import training_flops_per_token
    from calm_pretrain.models import count_config_parameters

    stage, cfg = getattr(ctx.pipe.stages, name), ctx.cfgs[name]
    rows = read_metrics(ctx.run / name)
    t = cfg.train
    sample_tokens = cfg.data.seq_chunks * getattr(cfg.model, "k", 1)
    tokens = rows[-1]["step"] * t.micro_batch_size * t.grad_accum_steps * stage.processes * sample_tokens
    flops = training_flops_per_token(cfg.model, cfg.data.seq_chunks).total * tokens
    first, last = rows[0]["loss"], rows[-1]["loss"]  # the first and last logged steps
    n_params = count_config_parameters(cfg.model)["total"]  # no need to load the checkpoint
    return {"params": n_params, "steps": rows[-1]["step"], "loss_first": first, "loss_last": last,
            "train_tokens": tokens, "train_flops": flops, "processes": stage.processes,
            "eval": {key: v for key, v in rows[-1].items() if key.startswith("eval/")}}


def autoencoder(ctx: DemoContext) -> dict:
    result = trained(ctx, "ae")
    acc, noisy = result["eval"]["eval/accuracy"], result["eval"]["eval/accuracy_noise_0.3"]
    result.update(accuracy=acc, accuracy_noise_0_3=noisy,
                  metric=f"{result['steps']} steps, {result['params'] / 1e6:.2f}M params; held-out reconstruction "
                         f"{100 * acc:.2f}% (σ = 0.3 latent noise: {100 * noisy:.2f}%)")
    return result


def encode(ctx: DemoContext) -> dict:
    from data_pipeline.manifest import load_manifest

    m = load_manifest(ctx.data / "latents")
    bpt = m.num_bytes / m.num_tokens
    lm_sample = ctx.cfgs["calm"].data.seq_chunks * ctx.k
    return {"samples": m.num_samples, "tokens": m.num_tokens, "bytes_per_token": bpt,
            "metric": f"{m.num_samples:,} samples of {lm_sample} tokens, {bpt:.1f} bytes/token "
                      f"({ctx.pipe.encode.dtype}, d = {ctx.cfgs['ae'].model.latent_dim})"}


def language_model(ctx: DemoContext, name: str) -> dict:
    """The CALM or the Transformer stage: the summary line of its engine, size and loss."""
    result = trained(ctx, name)
    stage = getattr(ctx.pipe.stages, name)
    engine = f"ZeRO-{ctx.cfgs[name].train.zero_stage} × {stage.processes}" if stage.processes > 1 else "1 process"
    result["metric"] = (f"{result['steps']} steps ({engine}), {result['params'] / 1e6:.2f}M params, "
                        f"{result['train_flops'] / 1e12:.1f} TFLOP; loss {result['loss_first']:.2f} → "
                        f"{result['loss_last']:.2f}")
    return result


def evaluate(ctx: DemoContext) -> dict:
    from calm_pretrain.eval.heldout import evaluate_model
    from calm_pretrain.eval.source import heldout_blocks
    from calm_pretrain.release.autoencoder import load_autoencoder

    run, data, blocks_n = ctx.run, ctx.data, ctx.pipe.eval.blocks
    ae = load_autoencoder(ctx.release / "ae")
    blocks = heldout_blocks(data / "heldout", blocks_n, batch=8)
    tr_blocks = blocks if ctx.tr_heldout == "heldout" else heldout_blocks(data / ctx.tr_heldout, blocks_n, batch=8)
    calm = evaluate_model(load_trained(run / "calm"), blocks, ae=ae)
    tr = evaluate_model(load_trained(run / "transformer"), tr_blocks)
    (run / "eval.json").write_text(json.dumps({"calm": calm, "transformer": tr}, indent=1))
    n = sum(b.numel() for b in blocks)
    flops = {name: ctx.runner.result(name).get("train_flops") for name in ("calm", "transformer")}
    return {"calm": calm["brierlm"], "transformer": tr["brierlm"], "heldout_tokens": n,
            "calm_brier_n": [calm[f"brier_{i}"] for i in range(1, 5)],
            "transformer_brier_n": [tr[f"brier_{i}"] for i in range(1, 5)],
            "calm_energy_skill": calm["energy_skill"], "calm_energy_skill_se": calm["energy_skill_se"],
            "train_flops": flops, "table": results_table(calm, tr, flops),
            "metric": f"BrierLM CALM {calm['brierlm']:.2f}, Transformer {tr['brierlm']:.2f}; CALM energy skill "
                      f"{calm['energy_skill']:+.4f} ± {calm['energy_skill_se']:.4f} "
                      f"({calm['energy_skill'] / calm['energy_skill_se']:+.1f} standard errors) on {n:,} "
                      "held-out tokens (table below)"}


def generate(ctx: DemoContext) -> dict:
    import torch

    from calm_pretrain.release.autoencoder import load_autoencoder
    from data_pipeline.tokenizers import load_tokenizer

    g, run = ctx.pipe.generate, ctx.run
    tok = load_tokenizer(ctx.tok_spec)
    ae = load_autoencoder(ctx.release / "ae")
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
        ctx.log(f"  [{name}] {text!r}")
    return {"samples": samples, "metric": f"{len(samples)} samples ({', '.join(samples)}) in samples.json"}


def reload_releases(ctx: DemoContext) -> dict:
    """After both language models are exported as releases: reloaded, they generate what the trained
    models do."""
    import torch

    from calm_pretrain.release import import_release, import_release_ae
    from calm_pretrain.release.autoencoder import load_autoencoder
    from data_pipeline.tokenizers import load_tokenizer

    run, release = ctx.run, ctx.release
    g, temp = ctx.pipe.generate, float(ctx.pipe.generate.temperatures[0])
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
        ctx.log(f"  [{name} release, T={temp:g}] {checks[name]['text']!r}")
    sizes = {name: sum(f.stat().st_size for f in (release / name).rglob("*") if f.is_file()) for name in MODELS}
    return {"releases": {n: str(release / n) for n in MODELS}, "bytes": sizes, "reloaded": checks,
            "metric": f"release/{{ae,calm,transformer}} ({sum(sizes.values()) / 1e6:.1f} MB); reloaded CALM "
                      f"(embedded AE) and Transformer generate the trained models' samples exactly"}


def plots(ctx: DemoContext) -> dict:
    out = plot_training(ctx.run, ctx.run / "plots" / "training.png")
    return {"png": str(out), "metric": f"{out.relative_to(ctx.run)}"}
