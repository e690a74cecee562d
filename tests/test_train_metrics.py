"""`run_training` in one process: metrics JSONL (MFU, memory, evaluation), wandb offline, TensorBoard."""
import json

import numpy as np
import pytest

from calm_pretrain.config import load_config
from calm_pretrain.train.checkpoint import trained_model
from calm_pretrain.train_command import held_out_blocks, run_training
from tests.helpers.brier import brierlm_of, exact_lm_brier_1, reconstruction_accuracy

TINY = ["model.vocab_size=64", "model.hidden_size=32", "model.intermediate_size=64", "model.pad_token_id=0",
        "model.eos_token_id=2", "model.bos_token_id=1", "train.warmup_steps=1", "train.log_every=1",
        "train.max_steps=4", "train.eval_every=2", "train.micro_batch_size=2", "eval.max_blocks=2"]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    from tests.helpers.data import write_token_dataset

    root = tmp_path_factory.mktemp("tokens")
    write_token_dataset(root / "k1", np.random.default_rng(0).integers(3, 64, (32, 16)), k=1)
    write_token_dataset(root / "k4", np.random.default_rng(1).integers(3, 64, (32, 16)), k=4, layout="ae")
    return root


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_transformer_run_logs_brier_mfu_memory_wandb_and_tensorboard(tmp_path, tokens):
    run = tmp_path / "run"
    cfg = load_config(None, ["model.arch=transformer", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=2",
                             *TINY, f"data.train={tokens / 'k1'}", f"data.eval={tokens / 'k1'}", "data.seq_chunks=16",
                             "train.wandb=offline", "train.tensorboard=true", f"train.output_dir={run}"])
    assert run_training(cfg, log=lambda s: None) == 0
    records = _records(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    evaluated = [r for r in records if "eval/brierlm" in r]
    assert [r["step"] for r in evaluated] == [2, 4]
    # The last evaluation is the final model's exact Brier-1 (its softmax, by hand, on the run's blocks).
    assert evaluated[-1]["eval/brier_1"] == pytest.approx(exact_lm_brier_1(trained_model(run), held_out_blocks(cfg)),
                                                          rel=1e-6)
    for r in records:
        # MFU is tokens/s × FLOPs per token / peak: recompute it from the logged parts.
        assert r["mfu"] > 0 and r["memory_gb"] > 0.01
        assert r["tokens"] == 2 * 16 and r["tokens_per_s"] == pytest.approx(r["tokens"] / r["step_time"])
    assert "rank 0/1 host" in (run / "ranks.txt").read_text()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run / "wandb").glob("offline-run-*"))
    assert (run / "config.yaml").is_file()


def test_autoencoder_run_logs_held_out_reconstruction(tmp_path, tokens):
    run = tmp_path / "run"
    cfg = load_config(None, ["model.arch=autoencoder", "model.k=4", "model.latent_dim=8", *TINY,
                             f"data.train={tokens / 'k4'}", f"data.eval={tokens / 'k4'}", "data.seq_chunks=4",
                             "train.wandb=off", f"train.output_dir={run}"])
    assert run_training(cfg, log=lambda s: None) == 0
    last = _records(run)[-1]
    ae, blocks = trained_model(run), held_out_blocks(cfg)
    assert last["eval/accuracy"] == reconstruction_accuracy(ae, blocks)  # the final AE's, counted by hand
    assert "eval/accuracy_noise_0.3" in last
    assert {"ce", "kl", "accuracy"} <= set(last)


def test_calm_run_with_its_autoencoder_scores_brierlm_and_refuses_other_latents(tmp_path, tokens):
    import torch

    from calm_pretrain.release.autoencoder import load_autoencoder, save_autoencoder
    from data_pipeline.encode import EncodeConfig, run_encode
    from data_pipeline.errors import IncompatibleDataError
    from tests.helpers.data import write_token_dataset
    from tests.helpers.models import tiny_ae_config
    from calm_pretrain.models import build_model

    torch.manual_seed(0)
    save_autoencoder(build_model(tiny_ae_config(vocab_size=64, latent_dim=8)).eval(), tmp_path / "ae")
    write_token_dataset(tmp_path / "lm", np.random.default_rng(2).integers(3, 64, (32, 16)), k=4, vocab_size=64)
    run_encode(EncodeConfig(tokens=str(tmp_path / "lm"), ae=str(tmp_path / "ae"), output=str(tmp_path / "lat")), load_autoencoder)
    run = tmp_path / "run"
    overrides = ["model.arch=calm", "model.k=4", "model.latent_dim=8", "model.num_layers=1", "model.num_heads=2",
                 "model.num_kv_heads=2", "model.head.num_samples=2", "model.head.num_target_samples=4",
                 "model.head.noise_size=8", "model.head.num_blocks=1", *TINY, f"data.train={tmp_path / 'lat'}",
                 f"data.eval={tmp_path / 'lm'}", "data.seq_chunks=4", f"model.ae_path={tmp_path / 'ae'}",
                 "train.wandb=off", f"train.output_dir={run}"]
    assert run_training(load_config(None, overrides), log=lambda s: None) == 0
    evaluated = [r for r in _records(run) if "eval/brierlm" in r]
    assert [r["step"] for r in evaluated] == [2, 4]
    last = evaluated[-1]  # BrierLM is the geometric mean of the logged Brier-n
    assert last["eval/brierlm"] == pytest.approx(brierlm_of(last, "eval/"), abs=1e-9)

    torch.manual_seed(1)  # another autoencoder: the latents were not made with it
    save_autoencoder(build_model(tiny_ae_config(vocab_size=64, latent_dim=8)).eval(), tmp_path / "other_ae")
    other = [o for o in overrides if not o.startswith(("model.ae_path", "train.output_dir"))]
    with pytest.raises(IncompatibleDataError, match="autoencoder fingerprint"):
        run_training(load_config(None, [*other, f"model.ae_path={tmp_path / 'other_ae'}",
                                        f"train.output_dir={tmp_path / 'run2'}"]), log=lambda s: None)


def test_a_run_continues_from_a_release(tmp_path, tokens):
    import torch

    from calm_pretrain.release import export_release, import_release
    from calm_pretrain.models import build_model

    base = ["model.arch=transformer", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=2", *TINY,
            f"data.train={tokens / 'k1'}", "data.seq_chunks=16", "train.wandb=off"]
    cfg = load_config(None, [*base, f"train.output_dir={tmp_path / 'unused'}"])
    torch.manual_seed(123)
    start = build_model(cfg.model)
    export_release(start, tmp_path / "release")
    run = tmp_path / "run"
    cfg = load_config(None, [*base, f"train.output_dir={run}", f"train.init_from={tmp_path / 'release'}",
                             "train.max_steps=1", "train.lr=1e-9", "train.warmup_steps=0"])
    assert run_training(cfg, log=lambda s: None) == 0
    from calm_pretrain.train.checkpoint import consolidated_state_dict

    trained, _ = consolidated_state_dict(run)
    for name, p in start.state_dict().items():  # one step at lr 1e-9: still the release's weights
        torch.testing.assert_close(trained[name], p, rtol=0, atol=1e-6)
    assert torch.equal(import_release(tmp_path / "release")[0].state_dict()["lm_head.weight"],
                       start.state_dict()["lm_head.weight"])
