"""Checkpoints in one process: keep-last-k, `latest`, damaged checkpoints, saves that die half-way."""
import json

import numpy as np
import pytest
import torch

from calm_pretrain.config import load_config
from calm_pretrain.models import build_model
from calm_pretrain.train.checkpoint import CheckpointError, Checkpointer, verify_checkpoint
from calm_pretrain.train.trainer import Trainer


@pytest.fixture
def tokens(tmp_path):
    from tests.helpers.data import write_token_dataset

    write_token_dataset(tmp_path / "tokens", np.random.default_rng(0).integers(3, 64, (64, 16)), k=1)
    return tmp_path / "tokens"


def _trainer(tmp_path, tokens, logs=None):
    from data_pipeline.loader import ShardLoader

    cfg = load_config(None, ["model.arch=transformer", "model.vocab_size=64", "model.hidden_size=32",
                             "model.intermediate_size=64", "model.num_layers=1", "model.num_heads=2",
                             "model.num_kv_heads=2", "model.pad_token_id=0", "model.eos_token_id=1",
                             "model.bos_token_id=1", "train.warmup_steps=1", "train.log_every=1", "train.max_steps=6",
                             "train.save_every=2", "train.keep_last=2", "data.seq_chunks=16"])
    torch.manual_seed(0)
    log = (logs.append if logs is not None else (lambda s: None))
    loader = ShardLoader(tokens, global_batch_size=4, seed=0, prefetch=0)
    run = tmp_path / "run"
    return Trainer(cfg, build_model(cfg.model), loader, run, log=log,
                   checkpointer=Checkpointer(run / "checkpoints", cfg.train.keep_last, log=log))


def _losses(run):
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_keep_last_and_latest(tmp_path, tokens):
    trainer = _trainer(tmp_path, tokens)
    trainer.fit()
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004", "step_00000006"]
    assert (root / "latest").read_text().strip() == "step_00000006"
    assert verify_checkpoint(root / "step_00000006") is None
    state = json.loads((root / "step_00000006" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["consumed_samples"] == 24 and state["loader"]["counts"] == [24]


def test_a_damaged_checkpoint_is_named_and_the_previous_one_used(tmp_path, tokens):
    _trainer(tmp_path, tokens).fit()
    straight = _losses(tmp_path / "run")
    engine_file = tmp_path / "run" / "checkpoints" / "step_00000006" / "engine" / "engine.pt"
    data = bytearray(engine_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    engine_file.write_bytes(bytes(data))
    logs = []
    trainer = _trainer(tmp_path, tokens, logs)
    assert trainer.resume().name == "step_00000004"
    warning = next(x for x in logs if x.startswith("WARNING"))
    assert "step_00000006 is damaged (engine/engine.pt does not match its checksum)" in warning
    trainer.fit()
    assert _losses(tmp_path / "run") == straight  # steps 5 and 6 again, identically


def test_a_save_that_dies_half_way_leaves_the_previous_checkpoint(tmp_path, tokens):
    trainer = _trainer(tmp_path, tokens)
    trainer.fit(2)
    root = tmp_path / "run" / "checkpoints"
    before = {p.relative_to(root): p.read_bytes() for p in (root / "step_00000002").rglob("*") if p.is_file()}

    real_save = trainer.engine.save

    def dying_save(path):
        real_save(path)
        (path / "engine.pt").write_bytes(b"truncat")  # the process dies mid-write
        raise KeyboardInterrupt

    trainer.engine.save = dying_save
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(4)
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert (root / "step_00000004.partial").is_dir() and not (root / "step_00000004").exists()
    after = {p.relative_to(root): p.read_bytes() for p in (root / "step_00000002").rglob("*") if p.is_file()}
    assert after == before

    resumed = _trainer(tmp_path, tokens)
    assert resumed.resume().name == "step_00000002"
    resumed.fit()
    assert not (root / "step_00000004.partial").exists()  # cleaned by the next save
    assert (root / "latest").read_text().strip() == "step_00000006"


def test_no_intact_checkpoint_is_an_error(tmp_path, tokens):
    _trainer(tmp_path, tokens).fit()
    for manifest in (tmp_path / "run" / "checkpoints").glob("step_*/manifest.json"):
        manifest.write_text("{broken")
    with pytest.raises(CheckpointError, match="no intact checkpoint to resume from"):
        _trainer(tmp_path, tokens).resume()
