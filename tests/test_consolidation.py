"""Consolidation (train/checkpoint.consolidated_state_dict): the engine a checkpoint records decides how it
is read, never its file names; every DeepSpeed checkpoint goes through DeepSpeed's universal conversion
(ZeRO-0, which that conversion cannot read, through its one fallback), and the weights it gives are the
live engine's own, gathered from the running ranks."""
import contextlib
import json
import os
import tempfile

import pytest
import torch

from calm_pretrain.config import load_config
from calm_pretrain.models import build_model
from calm_pretrain.train.checkpoint import (CheckpointError, Checkpointer, consolidated_state_dict, engine_kind,
                                            read_trainer_state, verify_checkpoint)
from tests.helpers.runs import reseal
from tests.helpers.ranks import run_distributed_test


TRANSFORMER = ["model.arch=transformer", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=2"]
# Its token embedding and output weight are one Parameter under two names (DeepSpeed stores it once).
AUTOENCODER = ["model.arch=autoencoder", "model.k=4", "model.latent_dim=8"]


def _cfg(*overrides, arch=TRANSFORMER):
    return load_config(None, [*arch, "model.vocab_size=64", "model.hidden_size=32", "model.intermediate_size=64",
                              "model.pad_token_id=0", "model.eos_token_id=2", "model.bos_token_id=1",
                              "train.warmup_steps=0", "train.precision=fp32", "train.micro_batch_size=2",
                              "train.grad_accum_steps=1", *overrides])


def _batches(seed):
    gen = torch.Generator().manual_seed(seed)
    return iter(lambda: {"ids": torch.randint(0, 64, (2, 16), generator=gen)}, None)


def _rewrite_state(checkpoint, **changes):
    """trainer_state.json with `changes` (None deletes the key), its manifest entry updated: an intact
    checkpoint that says something else."""
    state = read_trainer_state(checkpoint)
    for key, value in changes.items():
        state.pop(key, None) if value is None else state.__setitem__(key, value)
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    reseal(checkpoint, "trainer_state.json")
    assert verify_checkpoint(checkpoint) is None


def _torch_checkpoint(tmp_path):
    from calm_pretrain.parallel.engine import TorchEngine
    from calm_pretrain.train.trainer import model_loss

    cfg = _cfg()
    torch.manual_seed(0)
    engine = TorchEngine(build_model(cfg.model), cfg)
    engine.step(_batches(0), 1e-2, lambda forward, batch: model_loss(cfg.model, forward, batch))
    path = Checkpointer(tmp_path / "checkpoints", log=lambda s: None).save(1, engine, {"config": cfg.to_dict()})
    return path, {k: v.clone() for k, v in engine.module.state_dict().items()}


def test_the_recorded_engine_decides_how_a_checkpoint_is_read(tmp_path):
    path, live = _torch_checkpoint(tmp_path)
    assert read_trainer_state(path)["engine"] == "torch"
    state, _ = consolidated_state_dict(path)
    assert state.keys() == live.keys() and all(torch.equal(state[k], live[k]) for k in live)

    _rewrite_state(path, engine="deepspeed")  # says DeepSpeed, holds a plain engine's file: one clear error
    with pytest.raises(CheckpointError) as e:
        consolidated_state_dict(path)
    assert str(e.value).startswith(f"{path / 'engine' / 'engine.pt'}: a plain-PyTorch engine's file, but "
                                   f"{path / 'trainer_state.json'} says DeepSpeed wrote this checkpoint")

    _rewrite_state(path, engine="jax")
    with pytest.raises(CheckpointError, match="trainer_state.json: unknown engine 'jax'"):
        consolidated_state_dict(path)

    _rewrite_state(path, engine=None)  # written before checkpoints recorded their engine: inferred
    assert engine_kind(path, read_trainer_state(path)) == "torch"
    state, _ = consolidated_state_dict(path)
    assert all(torch.equal(state[k], live[k]) for k in live)

    _rewrite_state(path, engine="torch")  # says plain PyTorch, holds no engine.pt (nor lists it)
    (path / "engine" / "engine.pt").unlink()
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"]["engine/engine.pt"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError) as e:
        consolidated_state_dict(path)
    assert str(e.value).startswith(f"{path / 'engine' / 'engine.pt'}: missing; {path / 'trainer_state.json'} says "
                                   f"a plain-PyTorch engine wrote this checkpoint")


def test_resume_checks_the_recorded_engine_not_the_files(tmp_path):
    from calm_pretrain.train.trainer import Trainer

    path, _ = _torch_checkpoint(tmp_path)
    _rewrite_state(path, engine="deepspeed")
    cfg = _cfg()
    trainer = Trainer(cfg, build_model(cfg.model), _batches(0), tmp_path / "run", log=lambda s: None)
    with pytest.raises(CheckpointError, match="written by DeepSpeed .* but this run is one plain-PyTorch process"):
        trainer._check_engine_kind(path, read_trainer_state(path))


def _train_and_save(rank, world_size, zero_stage, tensor, arch, out):
    """Two DeepSpeed steps at ZeRO `zero_stage` and tensor-parallel size `tensor`, a checkpoint, and the
    live model's full weights beside it (gathered from the ZeRO-3 partitions or the TP ranks' slices)."""
    import deepspeed

    from calm_pretrain.parallel.distributed import init_distributed
    from calm_pretrain.parallel.engine import DeepSpeedEngine, build_model_sharded
    from calm_pretrain.parallel.groups import DeepSpeedMPU, init_model_parallel
    from calm_pretrain.parallel.tensor import apply_tensor_parallel, gather_tensor_parallel_state_dict
    from calm_pretrain.train.trainer import model_loss

    init_distributed()
    cfg = _cfg(f"train.zero_stage={zero_stage}", f"parallel.tensor={tensor}", arch=arch)
    torch.manual_seed(0)
    model = build_model_sharded(cfg, lambda: build_model(cfg.model), world_size)
    mpu, data_rank = None, rank
    if tensor > 1:
        data_rank = init_model_parallel(tensor, 1).dp_rank  # the ranks of a TP group read the same batch
        apply_tensor_parallel(model)
        mpu = DeepSpeedMPU()
    engine = DeepSpeedEngine(model, cfg, world_size, mpu=mpu)
    batches = _batches(data_rank)
    for _ in range(2):
        engine.step(batches, 1e-2, lambda forward, batch: model_loss(cfg.model, forward, batch))
    Checkpointer(out / "checkpoints", rank=rank, world_size=world_size, log=lambda s: None).save(
        2, engine, {"config": cfg.to_dict()})
    if tensor > 1:
        live = gather_tensor_parallel_state_dict(engine.module)
    else:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())) if zero_stage == 3 \
                else contextlib.nullcontext():
            live = {name: p.detach().clone() for name, p in engine.module.named_parameters(remove_duplicate=False)}
    if rank == 0:
        torch.save(live, out / "live.pt")


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage,tensor,arch", [(0, 1, TRANSFORMER), (1, 1, TRANSFORMER), (3, 1, TRANSFORMER),
                                                    (0, 2, TRANSFORMER), (1, 2, TRANSFORMER), (1, 1, AUTOENCODER),
                                                    (3, 1, AUTOENCODER)], ids=lambda v: v[0] if isinstance(v, list) else v)
def test_a_deepspeed_checkpoint_consolidates_to_the_live_engines_weights(tmp_path, zero_stage, tensor, arch, capfd):
    """ZeRO-0 goes through the fallback (its weights whole in the model-states files, TP slices merged),
    every other stage through DeepSpeed's universal conversion; 2 ranks: DP=2, or TP=2."""
    run_distributed_test(_train_and_save, 2, zero_stage, tensor, arch, tmp_path)
    live = torch.load(tmp_path / "live.pt")
    path = tmp_path / "checkpoints" / "step_00000002"
    assert read_trainer_state(path)["engine"] == "deepspeed"
    temp_before = set(os.listdir(tempfile.gettempdir()))
    capfd.readouterr()
    state, _ = consolidated_state_dict(path)
    assert capfd.readouterr() == ("", "")  # DeepSpeed's conversion progress is not shown to a user
    assert not {n for n in set(os.listdir(tempfile.gettempdir())) - temp_before if n.startswith("calm-")}
    assert state.keys() == live.keys()
    for name, weight in live.items():  # fp32: the master weights are the module's, bit for bit
        assert torch.equal(state[name], weight), name
    assert not list(path.parent.glob("*universal*")) and not list(path.glob("*universal*"))
