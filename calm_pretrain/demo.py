"""The main job: raw English text → tokenizer → autoencoder → latent shards → CALM and a Transformer
baseline → BrierLM and samples, on an embedded default that runs on a CPU in minutes.

Every stage writes its outputs under the run directory and a ``<stage>.done.json`` with its key
metric last; a re-run skips finished stages. The text is the Python standard library's own
documentation (docstrings and ``pydoc_data.topics``), present on every machine.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from calm_pretrain.config import RunConfig, load_config
from calm_pretrain.models import build_model, count_parameters
from calm_pretrain.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = {"ae": "configs/tiny/ae.yaml", "calm": "configs/tiny/calm.yaml",
                   "transformer": "configs/tiny/transformer.yaml"}


class Stages:
    """Runs named stages once; a finished stage leaves `<name>.done.json` with its summary."""

    def __init__(self, run_dir: Path, log: Callable[[str], None] = print):
        self.run_dir, self.log = run_dir, log
        self.summary: list[dict] = []

    def run(self, name: str, fn: Callable[[], dict]) -> dict:
        marker = self.run_dir / f"{name}.done.json"
        if marker.is_file():
            result = json.loads(marker.read_text())
            self.log(f"== {name}: done before, reusing ({result.get('metric', '')})")
        else:
            self.log(f"== {name}")
            t0 = time.perf_counter()
            result = fn()
            result["seconds"] = round(time.perf_counter() - t0, 1)
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1))
            tmp.replace(marker)
        self.summary.append({"stage": name, **result})
        return result


def _loader(cfg: RunConfig, path: Path, **kw):
    from data_pipeline.loader import ShardLoader

    return ShardLoader(path, global_batch_size=cfg.train.micro_batch_size, seed=cfg.data.seed, **kw)


def _held_out_blocks(path: Path, n: int, batch: int = 8) -> list[torch.Tensor]:
    from data_pipeline.loader import ShardLoader

    with ShardLoader(path, global_batch_size=batch, seed=0, prefetch=0) as loader:
        total = min(n, loader.samples_per_epoch)
        return [next(loader)["ids"] for _ in range(max(1, total // batch))]


def run_demo(run_dir: str | Path = "runs/demo", steps_scale: float = 1.0, log: Callable[[str], None] = print,
             configs: dict | None = None, eval_blocks: int = 32) -> list[dict]:
    from data_pipeline.ae_io import load_autoencoder, save_autoencoder
    from data_pipeline.encode import EncodeConfig, run_encode
    from data_pipeline.tokenize import TokenizeConfig, run_tokenize
    from data_pipeline.tokenizers import build_demo_tokenizer, load_tokenizer, stdlib_corpus

    from calm_pretrain.brier import evaluate_brier
    from calm_pretrain.sampling import generate_calm, generate_transformer

    torch.manual_seed(0)
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    configs = {**DEFAULT_CONFIGS, **(configs or {})}
    cfgs = {name: load_config(REPO / path) for name, path in configs.items()}
    for cfg in cfgs.values():
        cfg.train.max_steps = max(2, int(cfg.train.max_steps * steps_scale))
    ae_cfg, calm_cfg, tr_cfg = cfgs["ae"], cfgs["calm"], cfgs["transformer"]
    k = ae_cfg.model.k
    stages = Stages(run, log)
    tok_dir, data = run / "tokenizer", run / "data"

    def corpus():
        docs = stdlib_corpus()
        split = len(docs) * 19 // 20
        (run / "corpus").mkdir(exist_ok=True)
        for name, part in (("train", docs[:split]), ("heldout", docs[split:])):
            with (run / "corpus" / f"{name}.jsonl").open("w") as f:
                f.writelines(json.dumps({"text": t}) + "\n" for t in part)
        chars = sum(map(len, docs))
        return {"documents": len(docs), "characters": chars, "metric": f"{len(docs):,} documents, {chars / 1e6:.1f}M chars"}

    def tokenizer():
        tok = build_demo_tokenizer(tok_dir)
        return {"vocab_size": tok.vocab_size, "metric": f"byte-level BPE, vocab {tok.vocab_size}"}

    def tokenize():
        jobs = {"ae_tokens": ("train", "ae", ae_cfg.data.seq_chunks, k),
                "lm_tokens": ("train", "lm", calm_cfg.data.seq_chunks, k),
                "tr_tokens": ("train", "lm", tr_cfg.data.seq_chunks, 1),
                "heldout_calm": ("heldout", "lm", calm_cfg.eval.block_tokens // k, k),
                "heldout_tr": ("heldout", "lm", tr_cfg.eval.block_tokens, 1)}
        out = {}
        for name, (split, layout, seq_chunks, kk) in jobs.items():
            m = run_tokenize(TokenizeConfig(inputs=[str(run / "corpus" / f"{split}.jsonl")], output=str(data / name),
                                            tokenizer=str(tok_dir), layout=layout, k=kk, seq_chunks=seq_chunks,
                                            workers=2))
            out[name] = m.num_tokens
        return {**out, "metric": f"{out['lm_tokens']:,} training tokens"}

    def autoencoder():
        ae = build_model(ae_cfg.model)
        with _loader(ae_cfg, data / "ae_tokens") as loader:
            Trainer(ae_cfg, ae, loader, run / "ae", log=log).fit()
        save_autoencoder(ae.eval(), run / "ae" / "model")
        blocks = _held_out_blocks(data / "heldout_calm", eval_blocks)
        correct = noisy = total = 0
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for ids in blocks:
                mu, _ = ae.encode(ids)
                correct += (ae.decode(mu).argmax(-1) == ids).sum().item()
                noise = 0.3 * torch.randn(mu.shape, generator=gen)
                noisy += (ae.decode(mu + noise).argmax(-1) == ids).sum().item()
                total += ids.numel()
        acc, acc_noisy = correct / total, noisy / total
        return {"accuracy": acc, "accuracy_noise_0.3": acc_noisy,
                "metric": f"held-out reconstruction {100 * acc:.2f}% (σ=0.3 noise: {100 * acc_noisy:.2f}%)"}

    def encode():
        m = run_encode(EncodeConfig(tokens=str(data / "lm_tokens"), ae=str(run / "ae" / "model"),
                                    output=str(data / "latents")))
        return {"bytes_per_token": m.num_bytes / m.num_tokens,
                "metric": f"{m.num_samples:,} samples, {m.num_bytes / m.num_tokens:.1f} bytes/token"}

    def train(cfg: RunConfig, shards: str, name: str):
        def stage():
            model = build_model(cfg.model)
            with _loader(cfg, data / shards) as loader:
                history = Trainer(cfg, model, loader, run / name, log=log).fit()
            torch.save(model.state_dict(), run / name / "model.pt")
            first, last = history[0]["loss"], history[-1]["loss"]
            params = count_parameters(model)["total"]
            return {"loss_first": first, "loss_last": last, "params": params,
                    "metric": f"{params / 1e6:.2f}M params, loss {first:.3f} -> {last:.3f}"}
        return stage

    def load_trained(cfg: RunConfig, name: str):
        model = build_model(cfg.model)
        model.load_state_dict(torch.load(run / name / "model.pt", weights_only=True))
        return model.eval()

    def evaluate():
        ae = load_autoencoder(run / "ae" / "model")
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            calm = evaluate_brier(load_trained(calm_cfg, "calm"), _held_out_blocks(data / "heldout_calm", eval_blocks),
                                  ae=ae, generator=gen)
            tr = evaluate_brier(load_trained(tr_cfg, "transformer"), _held_out_blocks(data / "heldout_tr", eval_blocks),
                                generator=gen)
        (run / "eval.json").write_text(json.dumps({"calm": calm, "transformer": tr}, indent=1))
        return {"calm": calm["brierlm"], "transformer": tr["brierlm"],
                "metric": f"BrierLM CALM {calm['brierlm']:.2f}, Transformer {tr['brierlm']:.2f} "
                          f"(blocks of {calm['block_tokens']} / {tr['block_tokens']} tokens)"}

    def generate():
        tok = load_tokenizer(str(tok_dir))
        ae = load_autoencoder(run / "ae" / "model")
        calm, tr = load_trained(calm_cfg, "calm"), load_trained(tr_cfg, "transformer")
        prompt = torch.tensor(tok.encode("The module provides"), dtype=torch.long)
        samples = {}
        with torch.no_grad():
            for temp, label in ((1.0, "T=1"), (0.5, "T=1/2")):
                gen = torch.Generator().manual_seed(0)
                ids = generate_calm(calm, ae, prompt, 48, temperature=temp, num_candidates=64, generator=gen)
                samples[f"calm {label}"] = tok.decode(ids.tolist())
                gen = torch.Generator().manual_seed(0)
                ids = generate_transformer(tr, prompt, 48, temperature=temp, generator=gen)
                samples[f"transformer {label}"] = tok.decode(ids.tolist())
        (run / "samples.json").write_text(json.dumps(samples, indent=1))
        for name, text in samples.items():
            log(f"  [{name}] {text!r}")
        return {"samples": samples, "metric": f"{len(samples)} samples in samples.json"}

    stages.run("corpus", corpus)
    stages.run("tokenizer", tokenizer)
    stages.run("tokenize", tokenize)
    stages.run("autoencoder", autoencoder)
    stages.run("encode", encode)
    stages.run("calm", train(calm_cfg, "latents", "calm"))
    stages.run("transformer", train(tr_cfg, "tr_tokens", "transformer"))
    stages.run("evaluate", evaluate)
    stages.run("generate", generate)

    log("\n" + format_summary(stages.summary))
    (run / "summary.json").write_text(json.dumps(stages.summary, indent=1))
    return stages.summary


def format_summary(rows: list[dict]) -> str:
    width = max(len(r["stage"]) for r in rows)
    lines = [f"{'stage':<{width}}  {'time':>8}  key metric", "-" * (width + 60)]
    for r in rows:
        lines.append(f"{r['stage']:<{width}}  {r.get('seconds', 0):>7.1f}s  {r.get('metric', '')}")
    return "\n".join(lines)
