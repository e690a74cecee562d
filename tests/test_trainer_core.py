import json

import pytest
import torch

from calm_pretrain.config import load_config
from calm_pretrain.models import build_model
from calm_pretrain.train.trainer import Trainer


def _cfg(*overrides):
    return load_config(None, ["model.arch=transformer", "model.vocab_size=64", "model.hidden_size=32",
                              "model.intermediate_size=64", "model.num_layers=1", "model.num_heads=2",
                              "model.num_kv_heads=2", "model.pad_token_id=0", "model.eos_token_id=1",
                              "model.bos_token_id=1", "train.warmup_steps=2", "train.log_every=1",
                              "train.lr=3e-3", *overrides])


def _batches(seed=0):
    gen = torch.Generator().manual_seed(seed)
    pattern = torch.arange(64).repeat(2)  # a learnable sequence: next token = this + 1
    while True:
        starts = torch.randint(0, 64, (4,), generator=gen)
        yield {"ids": torch.stack([pattern[s:s + 16] for s in starts])}


def test_loss_falls_and_metrics_are_written(tmp_path):
    torch.manual_seed(0)
    cfg = _cfg("train.max_steps=40", "train.grad_accum_steps=2")
    history = Trainer(cfg, build_model(cfg.model), _batches(), tmp_path, log=lambda s: None).fit()
    assert history[-1]["loss"] < history[0]["loss"] - 1.0
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 41))
    assert lines[0]["lr"] == pytest.approx(1.5e-3) and lines[1]["lr"] == pytest.approx(3e-3)  # warm-up honoured
    assert lines[0]["tokens"] == 2 * 4 * 16


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path):
    torch.manual_seed(0)
    cfg = _cfg("train.max_steps=10", "train.max_nonfinite_steps=3")
    model = build_model(cfg.model)
    trainer = Trainer(cfg, model, _batches(), tmp_path, log=lambda s: None)
    trainer.fit(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer_state = {k: v.clone() for k, v in trainer.engine.optimizer.state[model.lm_head.weight].items()}
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    nan_weight = model.lm_head.weight.detach().clone()
    with pytest.raises(FloatingPointError, match="3 non-finite steps in a row at step 5"):
        trainer.fit()
    torch.testing.assert_close(model.transformer.layers[0].mlp.up_proj.weight,
                               before["transformer.layers.0.mlp.up_proj.weight"], rtol=0, atol=0)  # no update
    assert torch.equal(torch.isnan(model.lm_head.weight), torch.isnan(nan_weight))
    for k, v in trainer.engine.optimizer.state[model.lm_head.weight].items():  # Adam moments untouched
        assert torch.equal(v, optimizer_state[k]), k
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in lines] == [False, False, True, True, True]
    assert lines[-1]["nonfinite_total"] == 3


def test_activation_checkpointing_gives_the_same_gradients():
    from calm_pretrain.parallel.plan import apply_activation_checkpointing

    cfg = _cfg("model.num_layers=2")
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg.model).double()
        if checkpointed:
            assert apply_activation_checkpointing(model) == 2
        model(next(_batches())["ids"]).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-12, atol=1e-12)


def test_harmless_library_warnings_are_filtered_by_message_only():
    import warnings

    from calm_pretrain.train.console import filter_harmless_warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        filter_harmless_warnings()
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning)
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("Apex is broken in another way", UserWarning)
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated", UserWarning)  # other category
    assert [str(w.message) for w in seen] == ["Apex is broken in another way",
                                             "`torch.distributed.all_gather_into_tensor` is deprecated"]
