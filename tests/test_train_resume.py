"""`calm-pretrain train` as real rank processes: checkpoints, exact resume after SIGKILL, preemption
signals, resuming at another data-parallel size, and what a resume refuses."""
import json
import os
import random
import signal
import time

import numpy as np
import pytest
import yaml

from tests.distributed import launch_ranks, wait_ranks

# `data` (tiny latent and token shards) is a fixture of tests/conftest.py.

REQUEUE = 75
STEPS = 12


def _config(path, data, out, arch="calm", **train):
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


def _losses(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in lines]


def _log(run_dir):
    return "".join(p.read_text() for p in sorted((run_dir / "logs").glob("rank*.log")))


def _run(cfg_path, run_dir, world_size=2, extra=(), timeout=300):
    procs = launch_ranks(world_size, ["train", "--config", str(cfg_path), *extra], run_dir / "logs")
    codes = wait_ranks(procs, timeout)
    return codes


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_sigkill_at_a_random_step_then_resume_is_bit_exact(tmp_path, data, zero_stage):
    straight = tmp_path / "straight"
    cfg = _config(tmp_path / "straight.yaml", data, straight, zero_stage=zero_stage)
    assert _run(cfg, straight) == [0, 0], _log(straight)
    reference = _losses(straight)
    assert [s for s, _, _ in reference] == list(range(1, STEPS + 1))

    killed = tmp_path / "killed"
    cfg = _config(tmp_path / "killed.yaml", data, killed, zero_stage=zero_stage)
    kill_at = random.Random().randint(4, STEPS - 3)
    procs = launch_ranks(2, ["train", "--config", str(cfg)], killed / "logs")
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        done = metrics.is_file() and len(metrics.read_text().splitlines()) >= kill_at
        if done or any(p.poll() is not None for p in procs):
            break
        time.sleep(0.005)
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
    wait_ranks(procs)
    stopped_at = len(metrics.read_text().splitlines())
    assert stopped_at < STEPS, f"the run finished before it could be killed (kill_at {kill_at})\n{_log(killed)}"

    assert _run(cfg, killed) == [0, 0], _log(killed)
    log = _log(killed)
    assert "resumed from" in log, log
    assert _losses(killed) == reference, (kill_at, stopped_at)  # bit for bit: losses and gradient norms


def test_sigusr1_saves_and_exits_with_the_requeue_code(tmp_path, data):
    straight = tmp_path / "straight"
    _run(_config(tmp_path / "s.yaml", data, straight, arch="transformer"), straight)
    run = tmp_path / "run"
    # A slow step (per-step sleep is not available; a long run is): signal after the first logged step.
    cfg = _config(tmp_path / "r.yaml", data, run, arch="transformer", save_every=1000)
    procs = launch_ranks(2, ["train", "--config", str(cfg)], run / "logs")
    metrics = run / "metrics.jsonl"
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert all(p.poll() is None for p in procs), _log(run)
        time.sleep(0.005)
    os.kill(procs[1].pid, signal.SIGUSR1)  # one rank only: the ranks must agree among themselves
    codes = wait_ranks(procs)
    log = _log(run)
    assert codes == [REQUEUE, REQUEUE], log
    assert "received SIGUSR1" in log and "exiting with 75" in log
    saved = (run / "checkpoints" / "latest").read_text().strip()
    assert saved.startswith("step_") and int(saved[5:]) < STEPS
    assert _run(cfg, run) == [0, 0], _log(run)
    assert _losses(run) == _losses(straight)


def test_exit_after_minutes_and_refusals(tmp_path, data):
    run = tmp_path / "run"
    cfg = _config(tmp_path / "r.yaml", data, run, arch="transformer", save_every=1000)
    codes = _run(cfg, run, world_size=1, extra=["--exit-after-minutes", "0.0001"])
    assert codes == [REQUEUE], _log(run)
    assert "time budget" in _log(run)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000001"

    # A changed model shape is refused, naming what changed.
    bigger = _config(tmp_path / "b.yaml", data, run, arch="transformer")
    text = yaml.safe_load(bigger.read_text())
    text["model"]["intermediate_size"] = 96
    bigger.write_text(yaml.safe_dump(text))
    assert _run(bigger, run, world_size=1) == [1]
    assert "the model changed since it was saved" in _log(run) and "[64, 32] -> [96, 32]" in _log(run)

    # Changed data is refused too.
    other = tmp_path / "other_tokens"
    from data_pipeline.testing import write_token_dataset

    write_token_dataset(other, np.random.default_rng(1).integers(3, 64, (96, 32)), k=1)
    text = yaml.safe_load(cfg.read_text())
    text["data"]["train"] = [str(other)]
    changed = tmp_path / "c.yaml"
    changed.write_text(yaml.safe_dump(text))
    assert _run(changed, run, world_size=1) == [1]
    assert "the training data changed since it was saved" in _log(run)


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_resume_at_another_data_parallel_size(tmp_path, data, zero_stage):
    straight = tmp_path / "straight"
    _run(_config(tmp_path / "s.yaml", data, straight, arch="transformer", zero_stage=zero_stage), straight)
    run = tmp_path / "run"
    half = _config(tmp_path / "h.yaml", data, run, arch="transformer", max_steps=6, zero_stage=zero_stage)
    assert _run(half, run) == [0, 0], _log(run)
    # Same global batch (2 x 2 x 2 = 8) on one rank: micro-batch 2, accumulation 4.
    rest = _config(tmp_path / "r.yaml", data, run, arch="transformer", grad_accum_steps=4, zero_stage=zero_stage)
    assert _run(rest, run, world_size=1) == [0], _log(run)
    assert "resuming at data-parallel size 1 (was 2): same global sample order" in _log(run)
    a, b = _losses(straight), _losses(run)
    assert [s for s, _, _ in b] == list(range(1, STEPS + 1))
    for (_, x, _), (_, y, _) in zip(a, b):  # only the order of fp32 sums differs
        assert abs(x - y) < 1e-4 * abs(x), (a, b)


def test_export_from_zero1_and_zero3_checkpoints_gives_the_same_model(tmp_path, data):
    import subprocess
    import sys

    import torch

    from calm_pretrain.release import import_release

    models = {}
    for stage in (1, 3):
        run = tmp_path / f"zero{stage}"
        cfg = _config(tmp_path / f"z{stage}.yaml", data, run, zero_stage=stage, max_steps=3)
        assert _run(cfg, run) == [0, 0], _log(run)
        out = subprocess.run([sys.executable, "-m", "calm_pretrain.cli", "export", "--checkpoint", str(run),
                              "--out", str(tmp_path / f"release{stage}")], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        models[stage], _ = import_release(tmp_path / f"release{stage}")
    ids = torch.randint(3, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h1, h3 = (models[s].eval().hidden_states(ids) for s in (1, 3))
    torch.testing.assert_close(h1, h3, rtol=1e-4, atol=1e-5)  # same training, different partitioning
    bad = subprocess.run([sys.executable, "-m", "calm_pretrain.cli", "export", "--checkpoint", str(tmp_path / "none"),
                          "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 1 and "no checkpoint found" in bad.stderr
