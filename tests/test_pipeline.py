"""Pipeline parallelism (DeepSpeed PipelineModule, 1F1B) through `calm-pretrain train`: PP=2 reproduces
the losses of the same training without a pipeline, and resumes bit for bit after a SIGKILL."""
import signal
import time

import pytest
import torch

from calm_pretrain.config import ConfigError, load_config
from tests.helpers.runs import STEPS, read_log, read_losses, run_train, start_train, train_config


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["transformer", "calm"])
def test_two_stages_match_one(tmp_path, data, arch):
    # Same global batch (micro 2 × accumulation 2, one data-parallel replica) with and without a pipeline.
    flat, piped = tmp_path / "flat", tmp_path / "piped"
    assert run_train(train_config(tmp_path / "f.yaml", data, flat, arch=arch, max_steps=6), flat, world_size=1) == [0], read_log(flat)
    cfg = train_config(tmp_path / "p.yaml", data, piped, arch=arch, max_steps=6)
    assert run_train(cfg, piped, world_size=2, extra=["parallel.pipeline=2"]) == [0, 0], read_log(piped)
    a, b = read_losses(flat), read_losses(piped)
    assert [s for s, _, _ in b] == list(range(1, 7))
    assert a[0][1] != a[-1][1]
    # CALM's head noise is drawn on the last stage only: seeded alike, it matches the flat run's draws.
    for (_, x, gx), (_, y, gy) in zip(a, b):
        assert abs(x - y) < 1e-4 * abs(x) and abs(gx - gy) < 1e-3 * abs(gx), (a, b)
    assert "pp 1/2" in read_log(piped)
    # A pipeline checkpoint consolidates to the same named weights as the flat run's.
    from calm_pretrain.train.checkpoint import consolidated_state_dict

    (sa, _), (sb, _) = consolidated_state_dict(flat), consolidated_state_dict(piped)
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sb[name], sa[name], rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_pipeline_resumes_bit_exact_after_sigkill(tmp_path, data):
    straight = tmp_path / "straight"
    cfg = train_config(tmp_path / "s.yaml", data, straight, arch="calm")
    assert run_train(cfg, straight, extra=["parallel.pipeline=2"]) == [0, 0], read_log(straight)
    killed = tmp_path / "killed"  # its checkpoints written in the background: the pipeline's layer files too
    cfg = train_config(tmp_path / "k.yaml", data, killed, arch="calm", async_save=True)
    ranks = start_train(cfg, killed, extra=["parallel.pipeline=2"])
    metrics = killed / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 5):
        assert not ranks.any_exited(), read_log(killed)
        time.sleep(0.005)
    ranks.kill(signal.SIGKILL)
    ranks.wait(60, expect=None)
    assert len(metrics.read_text().splitlines()) < STEPS
    assert run_train(cfg, killed, extra=["parallel.pipeline=2"]) == [0, 0], read_log(killed)
    assert "resumed from" in read_log(killed)
    assert read_losses(killed) == read_losses(straight)


def test_pipeline_refuses_zero2_and_too_many_stages():
    base = ["model.arch=transformer", "model.num_layers=2"]
    with pytest.raises(ConfigError, match="train.zero_stage: = 2 cannot go with parallel.pipeline = 2"):
        load_config(None, [*base, "parallel.pipeline=2", "train.zero_stage=2"])
    with pytest.raises(ConfigError, match="parallel.pipeline: = 4 exceeds model.num_layers = 2"):
        load_config(None, [*base, "parallel.pipeline=4"])
