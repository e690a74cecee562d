"""Tiny `calm-pretrain train` runs as real rank processes, shared by the resume, pipeline and
model-parallel tests. The training data is conftest's `data` fixture (latent and token shards)."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.helpers.ranks import launch_ranks

REQUEUE = 75
STEPS = 12


def train_config(path, data, out, arch="calm", **train):
    """A tiny CALM (or Transformer) run config at `path`: 12 steps, a checkpoint every 3, into `out`."""
    model = {"arch": arch, "vocab_size": 64, "num_layers": 2, "hidden_size": 32, "intermediate_size": 64,
             "num_heads": 2, "num_kv_heads": 2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if arch == "calm":
        model.update(k=4, latent_dim=16, head={"num_blocks": 1, "noise_size": 8, "num_samples": 4,
                                                "num_target_samples": 8})
    cfg = {"name": f"t-{arch}", "model": model,
           "data": {"train": [str(data / ("latents" if arch == "calm" else "tokens"))],
                    "seq_chunks": 8 if arch == "calm" else 32},
           "train": {"max_steps": STEPS, "micro_batch_size": 2, "grad_accum_steps": 2, "warmup_steps": 2,
                     "lr": 3e-3, "precision": "fp32", "log_every": 1, "save_every": 3, "keep_last": 2,
                     "wandb": "off", "output_dir": str(out), **train}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_losses(run_dir):
    """(step, loss, grad_norm) of every row of the run's metrics.jsonl."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in lines]


def read_log(run_dir):
    return "".join(p.read_text() for p in sorted((run_dir / "logs").glob("rank*.log")))


def start_train(cfg_path, run_dir, world_size=2, extra=()):
    """`calm-pretrain train --config cfg_path <extra>` as `world_size` ranks, logging to run_dir/logs."""
    return launch_ranks(world_size, ["train", "--config", str(cfg_path), *extra], run_dir / "logs")


def run_train(cfg_path, run_dir, world_size=2, extra=(), timeout=300, expect=0):
    """Run it to the end (one deadline for all ranks); returns the exit codes, each `expect`."""
    return start_train(cfg_path, run_dir, world_size, extra).wait(timeout, expect=expect)


def reseal(checkpoint: Path, rel: str) -> None:
    """Rewrite `checkpoint`'s manifest entry for the file `rel` to match the file as it is now (what a
    careful attacker, or a test that edits a file on purpose, does), in the manifest's own hash."""
    from calm_pretrain.train.checkpoint_files import hash_of
    from data_pipeline.files import file_digest

    manifest_file = Path(checkpoint) / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    target = Path(checkpoint) / rel
    manifest["files"][rel] = [target.stat().st_size, file_digest(target, hash_of(manifest))]
    manifest_file.write_text(json.dumps(manifest))
