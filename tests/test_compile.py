"""train.compile: each block of the spec compiled in place trains like the eager model (same parameter
names, so checkpoints and releases do not change), under the plain engine and DeepSpeed ZeRO-1."""
import pytest
import torch

from calm_pretrain.config import ConfigError, load_config
from calm_pretrain.models import build_model
from calm_pretrain.parallel.plan import apply_compile
from calm_pretrain.train.trainer import Trainer
from tests.helpers.runs import read_log, read_losses, run_train, train_config

TINY = ["model.vocab_size=64", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1",
        "model.num_heads=2", "model.num_kv_heads=2", "model.k=2", "model.latent_dim=8", "model.head.num_blocks=1",
        "model.head.noise_size=8", "model.head.num_samples=4", "model.head.num_target_samples=8",
        "model.pad_token_id=0", "model.bos_token_id=1", "model.eos_token_id=2", "data.seq_chunks=8",
        "train.micro_batch_size=2", "train.warmup_steps=0", "train.lr=3e-3", "train.log_every=1"]


def _batches():
    gen = torch.Generator().manual_seed(0)
    while True:
        yield {"ids": torch.randint(3, 64, (2, 16), generator=gen), "mu": torch.randn(2, 8, 8, generator=gen),
               "log_sigma": torch.full((2, 8, 8), -1.0)}


def _train(compiled: bool, tmp_path):
    cfg = load_config(None, ["model.arch=calm", *TINY])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    names = [n for n, _ in model.named_parameters()]
    if compiled:
        assert apply_compile(model) == 2  # the decoder layer and the energy head
    torch.manual_seed(1)  # the head's noise and the loss's targets: the same draws in both runs
    history = Trainer(cfg, model, _batches(), tmp_path, log=lambda s: None).fit(4)
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == names
    return [r["loss"] for r in history], model.state_dict()


def test_compiled_blocks_train_like_the_eager_model(tmp_path):
    eager_losses, eager = _train(False, tmp_path / "eager")
    losses, compiled = _train(True, tmp_path / "compiled")
    assert losses == pytest.approx(eager_losses, rel=1e-4)
    for name, value in eager.items():
        torch.testing.assert_close(compiled[name], value, rtol=1e-4, atol=1e-5)


def test_compile_with_zero3_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"train\.compile: cannot go with train\.zero_stage = 3"):
        load_config(None, ["model.arch=calm", *TINY, "train.compile=true", "train.zero_stage=3"])


@pytest.mark.slow
def test_compile_under_deepspeed_zero1_follows_the_eager_run(tmp_path, data):
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile_{compiled}"
        cfg = train_config(tmp_path / f"c{compiled}.yaml", data, out, compile=compiled, max_steps=4, save_every=4)
        assert run_train(cfg, out, timeout=600) == [0, 0]
        runs[compiled] = read_losses(out)
        assert ("torch.compile on 3 blocks" in read_log(out)) == compiled  # 2 decoder layers + the head
    assert [s for s, _, _ in runs[True]] == [1, 2, 3, 4]
    for (_, a, na), (_, b, nb) in zip(runs[False], runs[True]):
        assert b == pytest.approx(a, rel=1e-4) and nb == pytest.approx(na, rel=1e-3)
