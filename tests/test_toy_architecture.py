"""The model registry's acceptance test: a new architecture plugs in by adding one package and one
registry line, and trains, checkpoints, resumes, exports and evaluates through the same commands.

The package is tests/helpers/toy_arch (a bigram LM with its own ModelSpec); the registry line is the
environment variable CALM_PRETRAIN_ARCHITECTURES naming it (calm_pretrain/models/registry.py). Every
step runs `python -m calm_pretrain.cli ...` in a subprocess, as a user would; nothing in calm_pretrain
knows the toy architecture.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from tests.helpers import REPO
from tests.helpers import toy_arch
from tests.helpers.brier import brierlm_of

PLUGIN = "tests.helpers.toy_arch"
VOCAB, T = 64, 32
TIMEOUT = 600  # one command; a loaded 2-core machine needs minutes for the imports alone


def _sequences(rng, n: int) -> np.ndarray:
    """Learnable streams for a bigram: a fixed permutation of ids 3..63 applied token after token."""
    perm = np.random.default_rng(1).permutation(VOCAB - 3) + 3
    x = np.empty((n, T), np.int64)
    x[:, 0] = rng.integers(3, VOCAB, n)
    for j in range(1, T):
        x[:, j] = perm[x[:, j - 1] - 3]
    return x


def _cli(*args, plugin: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "offline"}
    env.pop("RANK", None)
    env.pop("CALM_PRETRAIN_ARCHITECTURES", None)
    if plugin:
        env["CALM_PRETRAIN_ARCHITECTURES"] = PLUGIN
    return subprocess.run([sys.executable, "-m", "calm_pretrain.cli", *map(str, args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT)


def _ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _steps(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def toy_run(tmp_path):
    """Token shards (training and held-out) and a 4-step toy run config, a checkpoint every 2 steps."""
    from tests.helpers.data import write_token_dataset

    rng = np.random.default_rng(0)
    write_token_dataset(tmp_path / "train", _sequences(rng, 64), k=1, vocab_size=VOCAB)
    write_token_dataset(tmp_path / "heldout", _sequences(rng, 16), k=1, vocab_size=VOCAB)
    cfg = {"name": "toy-run", "model": {"arch": "toy", "vocab_size": VOCAB},
           "data": {"train": [str(tmp_path / "train")], "eval": str(tmp_path / "heldout"), "seq_chunks": T},
           "eval": {"max_blocks": 4},
           "train": {"max_steps": 4, "micro_batch_size": 4, "grad_accum_steps": 1, "warmup_steps": 1, "lr": 0.1,
                     "precision": "fp32", "log_every": 1, "save_every": 2, "eval_every": 4, "keep_last": 2,
                     "wandb": "off", "output_dir": str(tmp_path / "run")}}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, tmp_path / "run"


def test_the_toy_config_needs_its_registry_line(toy_run):
    """Without the registration `model.arch: toy` is refused, naming the architectures known; with it the
    config resolves to the package's dataclass (so the commands below depend on the registry lookup)."""
    from calm_pretrain.config import ConfigError, load_config
    from calm_pretrain.models.registry import architectures, registered, spec_of

    cfg_path, _ = toy_run
    known = "toy" in architectures()  # the pytest process itself may have been started with the plug-in
    if not known:
        with pytest.raises(ConfigError, match=r"model\.arch: unknown architecture 'toy'"):
            load_config(cfg_path)
    with contextlib.nullcontext() if known else registered(toy_arch.SPEC):
        cfg = load_config(cfg_path)
        assert isinstance(cfg.model, toy_arch.ToyConfig) and spec_of(cfg.model) is toy_arch.SPEC
    with pytest.raises(ConfigError, match="toy model has no tensor or pipeline split"):
        cfg.model.validate_parallel(2, 1)


@pytest.mark.slow
def test_toy_architecture_trains_resumes_evaluates_and_exports(toy_run, tmp_path):
    cfg_path, run_dir = toy_run
    # the registry line is what makes it known: without it, `train` refuses the config
    r = _cli("train", "--config", cfg_path, plugin=False)
    assert r.returncode == 2 and "unknown architecture 'toy'" in r.stderr, r.stderr[-2000:]

    out = _ok(_cli("train", "--config", cfg_path))
    assert "finished: step 4" in out and "eval: brier_1" in out
    assert _steps(run_dir) == [1, 2, 3, 4]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]

    out = _ok(_cli("train", "--config", cfg_path, "train.max_steps=8"))  # the same command, longer: resumes
    assert "resumed from" in out and "step_00000004 at step 4" in out and "finished: step 8" in out
    assert _steps(run_dir) == list(range(1, 9))
    loss = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert loss[-1] < loss[0]  # it learns the bigram

    scores = tmp_path / "eval.json"
    _ok(_cli("eval", run_dir, "--data", tmp_path / "heldout", "--max-blocks", 8, "--json", scores))
    result = json.loads(scores.read_text())
    assert result["arch"] == "toy" and result["scores"]["brierlm"] == pytest.approx(brierlm_of(result["scores"]))

    release = tmp_path / "release"
    _ok(_cli("export", "--checkpoint", run_dir, "--out", release))  # through its spec's release adapter
    assert json.loads((release / "config.json").read_text())["architectures"] == ["ToyBigramLM"]
    released = tmp_path / "release_eval.json"
    _ok(_cli("eval", release, "--data", tmp_path / "heldout", "--max-blocks", 8, "--json", released))
    assert json.loads(released.read_text())["scores"] == result["scores"]  # the same model, the same numbers
