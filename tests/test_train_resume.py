"""`calm-pretrain train` as real rank processes: checkpoints, exact resume after SIGKILL, preemption
signals, resuming at another data-parallel size, and what a resume refuses."""
import os
import signal
import time

import numpy as np
import pytest
import yaml

from tests.helpers.runs import REQUEUE, STEPS, read_log, read_losses, run_train, start_train, train_config
from tests.helpers.seeds import draw_seed

# `data` (tiny latent and token shards) is a fixture of tests/conftest.py.


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage,async_save", [(1, False), (3, False), (1, True), (3, True)])
def test_sigkill_at_a_random_step_then_resume_is_bit_exact(tmp_path, data, zero_stage, async_save):
    """The kill comes at a random step once a checkpoint is committed. With async_save it may come while
    a later one is being written in the background: the resume then starts from the last committed
    one, and still gives the same numbers."""
    straight = tmp_path / "straight"
    cfg = train_config(tmp_path / "straight.yaml", data, straight, zero_stage=zero_stage)
    assert run_train(cfg, straight) == [0, 0], read_log(straight)
    reference = read_losses(straight)
    assert [s for s, _, _ in reference] == list(range(1, STEPS + 1))

    killed = tmp_path / "killed"
    cfg = train_config(tmp_path / "killed.yaml", data, killed, zero_stage=zero_stage, async_save=async_save)
    seed = draw_seed("kill step")  # printed; CALM_TEST_SEED=<seed> replays the same kill step
    kill_at = np.random.default_rng(seed).integers(4, STEPS - 3, endpoint=True)
    ranks = start_train(cfg, killed)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 240
    committed = killed / "checkpoints" / "latest"  # a background save commits some steps after it began
    while time.time() < deadline:
        done = metrics.is_file() and len(metrics.read_text().splitlines()) >= kill_at and committed.is_file()
        if done or ranks.any_exited():
            break
        time.sleep(0.005)
    ranks.kill(signal.SIGKILL)
    ranks.wait(60, expect=None)
    stopped_at = len(metrics.read_text().splitlines())
    assert stopped_at < STEPS, f"the run finished before it could be killed (seed {seed}, kill_at {kill_at})\n" \
                               f"{read_log(killed)}"

    assert run_train(cfg, killed) == [0, 0], read_log(killed)
    log = read_log(killed)
    assert "resumed from" in log, log
    assert read_losses(killed) == reference, (seed, kill_at, stopped_at)  # bit for bit: losses and gradient norms


@pytest.mark.slow
def test_sigusr1_saves_and_exits_with_the_requeue_code(tmp_path, data):
    straight = tmp_path / "straight"
    run_train(train_config(tmp_path / "s.yaml", data, straight, arch="transformer"), straight)
    run = tmp_path / "run"
    # A slow step (per-step sleep is not available; a long run is): signal after the first logged step.
    cfg = train_config(tmp_path / "r.yaml", data, run, arch="transformer", save_every=1000)
    ranks = start_train(cfg, run)
    metrics = run / "metrics.jsonl"
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert not ranks.any_exited(), read_log(run)
        time.sleep(0.005)
    os.kill(ranks.pids[1], signal.SIGUSR1)  # one rank only: the ranks must agree among themselves
    codes = ranks.wait(expect=REQUEUE)
    log = read_log(run)
    assert codes == [REQUEUE, REQUEUE], log
    assert "received SIGUSR1" in log and "exiting with 75" in log
    saved = (run / "checkpoints" / "latest").read_text().strip()
    assert saved.startswith("step_") and int(saved[5:]) < STEPS
    assert run_train(cfg, run) == [0, 0], read_log(run)
    assert read_losses(run) == read_losses(straight)


@pytest.mark.slow
def test_exit_after_minutes_and_refusals(tmp_path, data):
    run = tmp_path / "run"
    cfg = train_config(tmp_path / "r.yaml", data, run, arch="transformer", save_every=1000)
    codes = run_train(cfg, run, world_size=1, extra=["--exit-after-minutes", "0.0001"], expect=REQUEUE)
    assert codes == [REQUEUE], read_log(run)
    assert "time budget" in read_log(run)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000001"

    # A changed model shape is refused, naming what changed.
    bigger = train_config(tmp_path / "b.yaml", data, run, arch="transformer")
    text = yaml.safe_load(bigger.read_text())
    text["model"]["intermediate_size"] = 96
    bigger.write_text(yaml.safe_dump(text))
    assert run_train(bigger, run, world_size=1, expect=1) == [1]
    assert "the model changed since it was saved" in read_log(run) and "[64, 32] -> [96, 32]" in read_log(run)

    # Changed data is refused too.
    other = tmp_path / "other_tokens"
    from tests.helpers.data import write_token_dataset

    write_token_dataset(other, np.random.default_rng(1).integers(3, 64, (96, 32)), k=1)
    text = yaml.safe_load(cfg.read_text())
    text["data"]["train"] = [str(other)]
    changed = tmp_path / "c.yaml"
    changed.write_text(yaml.safe_dump(text))
    assert run_train(changed, run, world_size=1, expect=1) == [1]
    assert "the training data changed since it was saved" in read_log(run)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 3])
def test_resume_at_another_data_parallel_size(tmp_path, data, zero_stage):
    straight = tmp_path / "straight"
    run_train(train_config(tmp_path / "s.yaml", data, straight, arch="transformer", zero_stage=zero_stage), straight)
    run = tmp_path / "run"
    half = train_config(tmp_path / "h.yaml", data, run, arch="transformer", max_steps=6, zero_stage=zero_stage)
    assert run_train(half, run) == [0, 0], read_log(run)
    # Same global batch (2 x 2 x 2 = 8) on one rank: micro-batch 2, accumulation 4.
    rest = train_config(tmp_path / "r.yaml", data, run, arch="transformer", grad_accum_steps=4, zero_stage=zero_stage)
    assert run_train(rest, run, world_size=1) == [0], read_log(run)
    assert "resuming at data-parallel size 1 (was 2): same global sample order" in read_log(run)
    a, b = read_losses(straight), read_losses(run)
    assert [s for s, _, _ in b] == list(range(1, STEPS + 1))
    for (_, x, _), (_, y, _) in zip(a, b):  # only the order of fp32 sums differs
        assert abs(x - y) < 1e-4 * abs(x), (a, b)


@pytest.mark.slow
def test_export_from_zero1_and_zero3_checkpoints_gives_the_same_model(tmp_path, data):
    import subprocess
    import sys

    import torch

    from calm_pretrain.release import import_release

    models = {}
    for stage in (1, 3):
        run = tmp_path / f"zero{stage}"
        cfg = train_config(tmp_path / f"z{stage}.yaml", data, run, zero_stage=stage, max_steps=3)
        assert run_train(cfg, run) == [0, 0], read_log(run)
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
