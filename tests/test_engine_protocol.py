"""The one engine interface (calm_pretrain.parallel.engine_api): every engine implements it, and a step
syncs with the host a constant number of times, however many micro-batches its window has."""
import inspect
import sys
from pathlib import Path

import pytest
import torch

from calm_pretrain.config import load_config
from calm_pretrain.models import build_model
from calm_pretrain.parallel.engine import DeepSpeedEngine, TorchEngine
from calm_pretrain.parallel.engine_api import ENGINE_KINDS, Engine, StepResult
from calm_pretrain.parallel.pipeline import PipelineEngine
from calm_pretrain.parallel import distributed
from calm_pretrain.train.trainer import Callback, Trainer, model_loss

MEMBERS = ("module", "kind", "device", "step", "save", "load")


def _cfg(*overrides):
    return load_config(None, ["model.arch=transformer", "model.vocab_size=64", "model.hidden_size=32",
                              "model.intermediate_size=64", "model.num_layers=1", "model.num_heads=2",
                              "model.num_kv_heads=2", "model.pad_token_id=0", "model.eos_token_id=1",
                              "model.bos_token_id=1", "train.warmup_steps=0", "train.log_every=1", *overrides])


def _batches(seed=0):
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield {"ids": torch.randint(0, 64, (2, 16), generator=gen)}


def test_the_protocol_names_the_interface():
    declared = set(Engine.__annotations__) | {n for n in vars(Engine) if not n.startswith("_")}
    assert set(MEMBERS) <= declared


@pytest.mark.parametrize("cls", [TorchEngine, DeepSpeedEngine, PipelineEngine])
def test_every_engine_class_implements_the_protocol(cls):
    """Methods with the Protocol's parameters, `device` a property; `module` is set in __init__ (the
    DeepSpeed engines need a process group to build, so a real instance is checked for TorchEngine)."""
    assert isinstance(inspect.getattr_static(cls, "device"), property)
    for name in ("step", "save", "load"):
        want = list(inspect.signature(getattr(Engine, name)).parameters)
        assert list(inspect.signature(getattr(cls, name)).parameters)[:len(want)] == want, (cls, name)
    assert "self.module" in inspect.getsource(cls.__init__)
    assert cls.kind in ENGINE_KINDS and cls.kind == ("torch" if cls is TorchEngine else "deepspeed")  # whose files its checkpoints hold
    assert not hasattr(cls, "train_window") and not hasattr(cls, "owns_schedule") and not hasattr(cls, "backward")


def test_a_torch_engine_is_an_engine_and_runs_one_window():
    cfg = _cfg("train.grad_accum_steps=3")
    torch.manual_seed(0)
    engine = TorchEngine(build_model(cfg.model), cfg)
    assert isinstance(engine, Engine) and engine.device == torch.device("cpu")
    pulled = []

    def batches():
        for b in _batches():
            pulled.append(b)
            yield b

    result = engine.step(batches(), 1e-3, lambda forward, batch: model_loss(cfg.model, forward, batch))
    assert isinstance(result, StepResult) and result.applied and len(pulled) == 3  # the window, no more
    assert result.tokens == 3 * 2 * 16 and result.loss.shape == () and result.grad_norm > 0


def _count_syncs_and_collectives(monkeypatch, accum: int, steps: int, log_every: int) -> dict:
    """Over `fit(steps)`: host syncs (.item(), float(), int(), bool(), .tolist() of a tensor) outside torch
    (torch's CPU AdamW reads each parameter's step count, a fused GPU optimizer does not), and the
    trainer's blocking collectives (in one process they return their input, but are still called)."""
    cfg = _cfg(f"train.grad_accum_steps={accum}", f"train.log_every={log_every}", f"train.max_steps={steps}")
    torch.manual_seed(0)
    trainer = Trainer(cfg, build_model(cfg.model), _batches(), "/nonexistent", log=lambda s: None)
    trainer.metrics.rank = 1  # write no metrics file
    count = {"syncs": 0, "collectives": 0}
    torch_dir = str(Path(torch.__file__).parent)
    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            count["syncs"] += not sys._getframe(1).f_code.co_filename.startswith(torch_dir)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for name in ("all_reduce_sum_tensor", "all_gather_object", "broadcast_object", "barrier"):
        original = getattr(distributed, name)

        def called(*args, _original=original, **kwargs):
            count["collectives"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(distributed, name, called)
    history = trainer.fit()
    monkeypatch.undo()
    assert len(history) == steps and not any(r["skipped"] for r in history)
    assert all(r["tokens"] == accum * 2 * 16 and isinstance(r["loss"], float) for r in history)
    return count


def test_host_syncs_and_collectives_come_on_log_steps_only(monkeypatch):
    """10 steps logged every 5: one sync per step (the gradient norm, which decides the update) and one
    per window of 5 (its numbers, agreed in one all-reduce), however many micro-batches a step has."""
    for accum in (1, 4):
        count = _count_syncs_and_collectives(monkeypatch, accum, steps=10, log_every=5)
        assert count == {"syncs": 10 + 2, "collectives": 2}, (accum, count)
    count = _count_syncs_and_collectives(monkeypatch, 1, steps=10, log_every=1)
    assert count == {"syncs": 10 + 10, "collectives": 10}, count


class _StopOnRank1:
    """Rank 1 sees a stop request from its third step on; rank 0 never does."""

    def __init__(self, trainer_of):
        self.trainer_of = trainer_of

    def requested(self) -> bool:
        trainer = self.trainer_of()
        return trainer.rank == 1 and trainer.step >= 3


def _vote_and_agree(rank, world_size, out):
    import json

    import torch.distributed as tdist

    tdist.init_process_group("gloo")
    cfg = _cfg("train.log_every=4", "train.max_steps=12")
    torch.manual_seed(0)
    local = []

    class Local(Callback):
        def on_step_end(self, trainer, record):
            local.append(float(record["loss"]))

    holder = {}
    trainer = Trainer(cfg, build_model(cfg.model), _batches(seed=rank), out, log=lambda s: None,
                      callbacks=[Local()], stop=_StopOnRank1(lambda: holder["t"]))
    holder["t"] = trainer
    history = trainer.fit()
    losses = [None] * world_size
    tdist.all_gather_object(losses, local)
    if rank == 0:
        Path(out, "result.json").write_text(json.dumps({
            "steps": len(history), "exit": trainer.exit_reason, "agreed": [r["loss"] for r in history],
            "local": losses, "tokens": [r["tokens"] for r in history]}))


def test_ranks_stop_at_the_same_step_and_agree_on_the_numbers(tmp_path):
    """The stop vote is asynchronous: rank 1's request at its 3rd step is read by both ranks at the
    4th, and both stop there. The logged loss of every step is the mean of the ranks' own."""
    import json

    from tests.helpers.ranks import run_distributed_test

    run_distributed_test(_vote_and_agree, 2, str(tmp_path), timeout=120)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["exit"] == "preempted" and result["steps"] == 4, result
    for step, agreed in enumerate(result["agreed"]):
        assert agreed == pytest.approx((result["local"][0][step] + result["local"][1][step]) / 2, rel=1e-12)
    assert result["local"][0] != result["local"][1]  # the ranks saw different batches
    assert result["tokens"] == [2 * 2 * 16] * 4
