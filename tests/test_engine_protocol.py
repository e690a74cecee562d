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
from calm_pretrain.train.trainer import Trainer, model_loss

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


def _syncs_of_one_step(monkeypatch, accum: int) -> tuple[int, int]:
    """Host syncs (.item(), float(), int(), bool(), .tolist() of a tensor) in one Trainer step: (all, those
    outside torch: torch's CPU AdamW reads each parameter's step count, a fused GPU optimizer does not)."""
    cfg = _cfg(f"train.grad_accum_steps={accum}")
    torch.manual_seed(0)
    trainer = Trainer(cfg, build_model(cfg.model), _batches(), "/nonexistent", log=lambda s: None)
    count = [0, 0]
    torch_dir = str(Path(torch.__file__).parent)
    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            count[0] += 1
            count[1] += not sys._getframe(1).f_code.co_filename.startswith(torch_dir)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    record = trainer.train_step()
    monkeypatch.undo()
    assert not record["skipped"] and record["tokens"] == accum * 2 * 16
    return tuple(count)


def test_host_syncs_per_step_do_not_grow_with_the_micro_batches(monkeypatch):
    one, four = _syncs_of_one_step(monkeypatch, 1), _syncs_of_one_step(monkeypatch, 4)
    assert one == four, (one, four)
    assert four[1] == 2, four  # ours: the gradient norm (to decide the update) and the step's loss
