"""`data.latents: on_the_fly`: CALM from token shards, the frozen AE encoding every micro-batch in the step.

The latents it trains on are the AE's own encoding of the batch's ids (computed here independently),
a run gives the losses of a stored-latent run on the same tokens (compared at the stored run's bf16
rounding, exactly), the AE stays out of the checkpoint, and every wrong combination is one clear error.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from calm_pretrain.config import ConfigError, load_config
from calm_pretrain.train_command import run_training

TINY = ["model.arch=calm", "model.vocab_size=64", "model.hidden_size=32", "model.intermediate_size=64",
        "model.pad_token_id=0", "model.eos_token_id=2", "model.bos_token_id=1", "model.k=4", "model.latent_dim=8",
        "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=2", "model.head.num_samples=2",
        "model.head.num_target_samples=4", "model.head.noise_size=8", "model.head.num_blocks=1",
        "data.seq_chunks=4", "train.warmup_steps=1", "train.log_every=1", "train.max_steps=4", "train.save_every=2",
        "train.micro_batch_size=2", "train.grad_accum_steps=2", "train.precision=fp32", "train.wandb=off"]


@pytest.fixture
def shards(tmp_path):
    """A tiny AE, 32 token samples of 16 tokens, and their bf16 latent shards encoded by it."""
    from calm_pretrain.models import build_model
    from calm_pretrain.release.autoencoder import load_autoencoder, save_autoencoder
    from data_pipeline.encode import EncodeConfig, run_encode
    from tests.helpers.data import write_token_dataset
    from tests.helpers.models import tiny_ae_config

    torch.manual_seed(0)
    save_autoencoder(build_model(tiny_ae_config(vocab_size=64, latent_dim=8)).eval(), tmp_path / "ae")
    write_token_dataset(tmp_path / "tok", np.random.default_rng(2).integers(3, 64, (32, 16)), k=4, vocab_size=64)
    run_encode(EncodeConfig(tokens=str(tmp_path / "tok"), ae=str(tmp_path / "ae"), output=str(tmp_path / "lat"),
                            progress=False), load_autoencoder)
    return tmp_path


def _config(root, run: str, *extra: str):
    return load_config(None, [*TINY, f"model.ae_path={root / 'ae'}", f"train.output_dir={root / run}", *extra])


def _losses(run_dir) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def test_on_the_fly_batches_hold_the_aes_own_encoding(shards):
    from calm_pretrain.release.autoencoder import load_autoencoder
    from data_pipeline.loader import ShardLoader
    from data_pipeline.on_the_fly import OnTheFlyLatents

    ae = load_autoencoder(shards / "ae")
    transform = OnTheFlyLatents(load_autoencoder(shards / "ae"), "cpu", k=4, latent_dim=8, where=str(shards / "ae"))
    tokens = ShardLoader(shards / "tok", global_batch_size=4, seed=7, prefetch=0)
    stored = ShardLoader(shards / "lat", global_batch_size=4, seed=7, prefetch=0)
    for _ in range(3):
        raw, reference = next(tokens), next(stored)
        assert set(raw) == {"ids"}  # token shards: ids only
        batch = transform(raw)
        with torch.no_grad():
            mu, log_sigma = ae.encode(raw["ids"])  # independently: the AE's forward on the same ids
        assert batch["mu"].dtype == torch.float32 and batch["mu"].shape == (4, 4, 8)
        assert torch.equal(batch["mu"], mu) and torch.equal(batch["log_sigma"], log_sigma)
        assert torch.equal(batch["ids"], reference["ids"])  # the same samples in the same order as the latents
        # the latent shards hold the same posterior, rounded to bf16 (round to nearest even)
        assert torch.equal(reference["mu"], mu.bfloat16().float())
        assert torch.equal(reference["log_sigma"], log_sigma.bfloat16().float())
    assert not any(p.requires_grad for p in transform.ae.parameters()) and not transform.ae.training
    tokens.close()
    stored.close()


def test_training_on_the_fly_gives_the_stored_runs_losses(shards, monkeypatch):
    from calm_pretrain.train.checkpoint import consolidated_state_dict, read_trainer_state, resolve_checkpoint
    from data_pipeline import on_the_fly
    from calm_pretrain.release.autoencoder import load_autoencoder
    from data_pipeline.ae_io import autoencoder_fingerprint

    assert run_training(_config(shards, "stored", f"data.train={shards / 'lat'}"), log=lambda s: None) == 0
    assert run_training(_config(shards, "fly32", f"data.train={shards / 'tok'}", "data.latents=on_the_fly"),
                        log=lambda s: None) == 0
    exact = on_the_fly.encode_posterior

    def at_bf16(ae, ids):  # the on-the-fly encoding rounded as the stored run's shards round it
        mu, log_sigma = exact(ae, ids)
        return mu.bfloat16().float(), log_sigma.bfloat16().float()

    monkeypatch.setattr(on_the_fly, "encode_posterior", at_bf16)
    assert run_training(_config(shards, "fly16", f"data.train={shards / 'tok'}", "data.latents=on_the_fly"),
                        log=lambda s: None) == 0
    stored, fly16, fly32 = (_losses(shards / r) for r in ("stored", "fly16", "fly32"))
    assert [s for s, _ in stored] == [1, 2, 3, 4]
    assert fly16 == stored  # the same samples, latents, noise and updates: the same losses, bit for bit
    assert fly32 != stored  # float32 latents are not the bf16 ones ...
    assert [v for _, v in fly32] == pytest.approx([v for _, v in stored], rel=2e-2)  # ... but barely differ

    ckpt = resolve_checkpoint(shards / "fly32")
    state = read_trainer_state(ckpt)
    fingerprint = autoencoder_fingerprint(load_autoencoder(shards / "ae"))
    assert state["batch_transform"] == {"latents": "on_the_fly", "ae_fingerprint": fingerprint,
                                        "ae_path": str(shards / "ae")}
    assert state["data_sources"]["ae_fingerprint"] == fingerprint and state["data_sources"]["kind"] == "tokens"
    weights, _ = consolidated_state_dict(ckpt)
    assert weights and not any(name.startswith(("encoder.", "decoder.")) for name in weights)  # the AE is not saved


def test_on_the_fly_resume_refuses_another_autoencoder(shards):
    from calm_pretrain.models import build_model
    from calm_pretrain.release.autoencoder import save_autoencoder
    from data_pipeline.errors import IncompatibleDataError
    from calm_pretrain.train.checkpoint import CheckpointError
    from tests.helpers.models import tiny_ae_config

    fly = [f"data.train={shards / 'tok'}", "data.latents=on_the_fly"]
    assert run_training(_config(shards, "run", *fly, "train.max_steps=2"), log=lambda s: None) == 0
    torch.manual_seed(1)  # another autoencoder of the same shape
    save_autoencoder(build_model(tiny_ae_config(vocab_size=64, latent_dim=8)).eval(), shards / "other_ae")
    other = load_config(None, [*TINY, *fly, f"model.ae_path={shards / 'other_ae'}",
                               f"train.output_dir={shards / 'run'}"])
    with pytest.raises(IncompatibleDataError, match=r"trained on the latents of autoencoder \w+ .*other_ae is "
                                                    r"autoencoder \w+: refusing to resume"):
        run_training(other, log=lambda s: None)
    with pytest.raises(CheckpointError, match="data.latents = stored"):  # the same directory, stored latents
        run_training(_config(shards, "run", f"data.train={shards / 'lat'}"), log=lambda s: None)
    assert run_training(_config(shards, "run", *fly), log=lambda s: None) == 0  # its own AE: it continues
    assert [s for s, _ in _losses(shards / "run")] == [1, 2, 3, 4]


def test_wrong_shards_and_autoencoders_are_refused(shards):
    from calm_pretrain.models import build_model
    from calm_pretrain.release.autoencoder import save_autoencoder
    from data_pipeline.errors import IncompatibleDataError
    from tests.helpers.models import tiny_ae_config

    with pytest.raises(IncompatibleDataError, match=r"lat/manifest.json: holds latents shards, but data.latents = "
                                                    r"on_the_fly reads token shards .*tok/manifest.json"):
        run_training(_config(shards, "a", f"data.train={shards / 'lat'}", "data.latents=on_the_fly"),
                     log=lambda s: None)
    with pytest.raises(IncompatibleDataError, match="tok/manifest.json: holds tokens shards, but the run needs "
                                                    "latent shards .*data.latents=on_the_fly"):
        run_training(_config(shards, "b", f"data.train={shards / 'tok'}"), log=lambda s: None)
    save_autoencoder(build_model(tiny_ae_config(vocab_size=64, latent_dim=16)).eval(), shards / "ae16")
    wide = load_config(None, [*TINY, f"data.train={shards / 'tok'}", "data.latents=on_the_fly",
                              f"model.ae_path={shards / 'ae16'}", f"train.output_dir={shards / 'c'}"])
    with pytest.raises(IncompatibleDataError, match="ae16: the autoencoder has latent dim d = 16 but the run's "
                                                    "model has latent dim d = 8"):
        run_training(wide, log=lambda s: None)
    assert not (shards / "a" / "checkpoints").exists() and not (shards / "c" / "checkpoints").exists()


def test_the_config_key_is_checked():
    base = [*TINY, "data.train=/nowhere"]
    with pytest.raises(ConfigError, match=r"^data.latents: must be stored or on_the_fly, got 'cached'"):
        load_config(None, [*base, "data.latents=cached"])
    with pytest.raises(ConfigError, match=r"^data.latents: = on_the_fly .* model.ae_path is not set"):
        load_config(None, [*base, "data.latents=on_the_fly"])
    transformer = ["model.arch=transformer", "model.vocab_size=64", "model.pad_token_id=0", "model.bos_token_id=1",
                   "model.eos_token_id=2", "data.latents=on_the_fly"]
    with pytest.raises(ConfigError, match=r"^data.latents: = on_the_fly .* a transformer model trains on token"):
        load_config(None, transformer)
    assert load_config(None, base).data.latents == "stored"


def test_export_checks_the_embedded_autoencoder_against_the_one_run_in_the_step(shards):
    from calm_pretrain.models import build_model
    from calm_pretrain.release import ReleaseError, export_release
    from calm_pretrain.release.from_checkpoint import export_checkpoint
    from calm_pretrain.release.autoencoder import load_autoencoder
    from tests.helpers.models import tiny_ae_config

    export_release(load_autoencoder(shards / "ae"), shards / "ae_release")
    torch.manual_seed(1)
    export_release(build_model(tiny_ae_config(vocab_size=64, latent_dim=8)).eval(), shards / "other_release")
    cfg = load_config(None, [*TINY, f"data.train={shards / 'tok'}", "data.latents=on_the_fly", "train.max_steps=2",
                             f"model.ae_path={shards / 'ae_release'}", f"train.output_dir={shards / 'run'}"])
    assert run_training(cfg, log=lambda s: None) == 0
    with pytest.raises(ReleaseError, match="other_release has fingerprint .* trained on latents encoded by"):
        export_checkpoint(shards / "run", shards / "bad", embed_ae=str(shards / "other_release"), say=lambda s: None)
    _, source = export_checkpoint(shards / "run", shards / "good", embed_ae=str(shards / "ae_release"),
                                  say=lambda s: None)
    assert source["embedded_ae_fingerprint"] == source["data"]["ae_fingerprint"]
    assert source["data"]["latents"] == "on_the_fly" and not (shards / "bad").exists()


@pytest.mark.slow
def test_on_the_fly_under_deepspeed_data_parallel(shards):
    """Two DeepSpeed ZeRO-1 ranks, each encoding its own micro-batches: the stored run's losses (up to the
    stored bf16 rounding), and a resume from its checkpoint on the same AE."""
    from calm_pretrain.config import dump_config
    from tests.helpers.runs import read_log, run_train

    def config(name: str, *extra: str):
        cfg = _config(shards, name, "train.engine=deepspeed", "train.zero_stage=1", *extra)
        path = shards / f"{name}.yaml"
        path.write_text(dump_config(cfg))
        return path

    stored = config("stored", f"data.train={shards / 'lat'}")
    assert run_train(stored, shards / "stored") == [0, 0], read_log(shards / "stored")
    fly = [f"data.train={shards / 'tok'}", "data.latents=on_the_fly"]
    assert run_train(config("fly", *fly, "train.max_steps=2"), shards / "fly") == [0, 0], read_log(shards / "fly")
    assert run_train(config("fly", *fly), shards / "fly") == [0, 0], read_log(shards / "fly")
    log = read_log(shards / "fly")
    assert "latents on the fly (autoencoder" in log and "resumed from" in log
    a, b = _losses(shards / "stored"), _losses(shards / "fly")
    assert [s for s, _ in b] == [1, 2, 3, 4]
    assert [v for _, v in b] == pytest.approx([v for _, v in a], rel=2e-2)


@pytest.mark.gpu
def test_on_the_fly_on_the_gpu_encodes_as_calm_data_encode_does(shards):
    """On CUDA the AE runs on the training device in bf16 autocast: the batch equals calm-data encode's
    encoding on that device, is near the float32 CPU one, and a run trains on it."""
    from calm_pretrain.release.autoencoder import load_autoencoder
    from data_pipeline.encode import encode_ids
    from data_pipeline.on_the_fly import OnTheFlyLatents

    cuda = torch.device("cuda")
    ae = load_autoencoder(shards / "ae")
    ids = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cpu_mu, _ = ae.encode(ids)
    pre_mu, pre_log_sigma = encode_ids(load_autoencoder(shards / "ae"), ids.numpy(), cuda)
    batch = OnTheFlyLatents(ae, cuda, k=4, latent_dim=8, where="ae")({"ids": ids})
    assert batch["ids"].device.type == "cuda" and batch["mu"].device.type == "cuda"
    assert next(ae.parameters()).device.type == "cuda"
    assert np.array_equal(batch["mu"].cpu().numpy(), pre_mu)
    assert np.array_equal(batch["log_sigma"].cpu().numpy(), pre_log_sigma)
    assert (batch["mu"].cpu() - cpu_mu).abs().max() < 5e-2 * max(1.0, float(cpu_mu.abs().max()))
    cfg = _config(shards, "gpu", f"data.train={shards / 'tok'}", "data.latents=on_the_fly", "train.max_steps=2")
    assert run_training(cfg, log=lambda s: None) == 0
    assert [s for s, _ in _losses(shards / "gpu")] == [1, 2]
