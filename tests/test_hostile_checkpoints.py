"""Hostile and unlucky cases of checkpoints and run directories (issue 15), one test per case.

Every test drives the real `calm-pretrain` command line (or the real trainer) on real files, does
what a hostile or unlucky user would do to the run directory, and checks that nothing is lost and
that the message is one clear line naming the problem and the file.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from calm_pretrain.train.checkpoint import verify_checkpoint
from tests.distributed import launch_ranks, wait_ranks

REQUEUE = 75


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """Token shards: 96 samples of 32 ids below 64 (k=1, the Transformer's)."""
    from data_pipeline.testing import write_token_dataset

    root = tmp_path_factory.mktemp("tokens")
    write_token_dataset(root / "train", np.random.default_rng(0).integers(3, 64, (96, 32)), k=1)
    return root / "train"


def _config(path: Path, data: Path, out: Path, model: dict | None = None, **train) -> Path:
    """A tiny Transformer run config at `path`, training on `data` into `out`."""
    cfg = {"name": "hostile", "model": {"arch": "transformer", "vocab_size": 64, "num_layers": 1, "hidden_size": 32,
                                        "intermediate_size": 64, "num_heads": 2, "num_kv_heads": 2,
                                        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **(model or {})},
           "data": {"train": [str(data)], "seq_chunks": 32},
           "train": {"max_steps": 6, "micro_batch_size": 2, "warmup_steps": 1, "lr": 3e-3, "precision": "fp32",
                     "log_every": 1, "save_every": 2, "keep_last": 3, "wandb": "off", "output_dir": str(out),
                     **train}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(cfg: Path, *overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`calm-pretrain train` in one process (plain PyTorch engine)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, "-m", "calm_pretrain.cli", "train", "--config", str(cfg), *overrides],
                          capture_output=True, text=True, timeout=timeout, env={**env, "OMP_NUM_THREADS": "1"})


def _steps(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("step_*") if p.is_dir())


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# ---- 1. pruning after a fallback ---------------------------------------------------------------
def test_pruning_after_a_fallback_keeps_the_good_checkpoints(tmp_path, tokens):
    run = tmp_path / "run"
    cfg = _config(tmp_path / "run.yaml", tokens, run)
    first = _train(cfg)
    assert first.returncode == 0, first.stderr
    root = run / "checkpoints"
    assert _steps(root) == ["step_00000002", "step_00000004", "step_00000006"]
    engine_file = root / "step_00000006" / "engine" / "engine.pt"
    engine_file.write_bytes(engine_file.read_bytes()[:1000])  # truncated

    second = _train(cfg, "train.max_steps=5", "train.save_every=1", "train.keep_last=1")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and "step_00000004 at step 4" in second.stdout
    # The damaged step 6 did not count as kept: step 5 (the newest intact) is there and `latest` names it.
    assert "step_00000005" in _steps(root)
    assert (root / "latest").read_text().strip() == "step_00000005"
    assert "step_00000006 is damaged" in second.stdout and "not counted towards train.keep_last" in second.stdout

    third = _train(cfg, "train.max_steps=6", "train.save_every=1", "train.keep_last=1")
    assert third.returncode == 0, third.stderr
    assert "step_00000005 at step 5" in third.stdout
    assert (root / "latest").read_text().strip() == "step_00000006"


# ---- 2. divergence -----------------------------------------------------------------------------
@pytest.mark.parametrize("lr, stop", [
    (30, "training diverged: 10 suspect steps in a row at step 15"),  # finite: loss 4 -> 2000 -> 4e6
    (1e9, "20 non-finite steps in a row at step 25"),  # non-finite gradients from step 6 on
])
def test_a_divergence_keeps_the_last_checkpoint_before_it_and_says_so(tmp_path, tokens, lr, stop):
    import torch

    run = tmp_path / "run"
    cfg = _config(tmp_path / "run.yaml", tokens, run, max_steps=4, save_every=2, keep_last=2, divergence_warmup=2)
    assert _train(cfg).returncode == 0
    diverging = _train(cfg, f"train.lr={lr}", "train.max_steps=40")
    assert diverging.returncode == 1
    root = run / "checkpoints"
    first_suspect = next(r["step"] for r in _metrics(run) if r["suspect"])
    assert first_suspect == 6  # step 5's update shows in step 6's loss and gradient
    good = root / "step_00000004"
    message = diverging.stderr.strip()
    assert "\n" not in message and message.startswith(f"error: {stop}"), message  # one line, no traceback
    assert message.endswith(f"the newest checkpoint before the first suspect step 6 is {good}, kept (pinned in "
                            f"{root / 'pinned.json'}: never pruned); later checkpoints may hold diverged weights")
    # Saves went on (keep_last=2) and pruned everything else, but not the pinned pre-divergence checkpoint.
    assert "step_00000004" in _steps(root) and len(_steps(root)) == 3 and verify_checkpoint(good) is None
    weights = torch.load(good / "engine" / "engine.pt", weights_only=True)["model"]
    assert max(v.abs().max().item() for v in weights.values()) < 10  # the weights from before the divergence
