"""On a CUDA device (marker `gpu`; skipped without one, and run by tools/gpu_check.sh): the models in
bf16 against a float64 CPU computation, flash attention against the math kernel, and the trainer's
bf16 path end to end. The CPU suite never reaches these code paths' device-specific parts."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from calm_pretrain.config import load_config
from calm_pretrain.models.calm import CALMConfig, HeadConfig
from calm_pretrain.models.transformer import TransformerConfig
from calm_pretrain.models import build_model
from tests.helpers.models import perturbed

pytestmark = pytest.mark.gpu
COMMON = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
              max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _ids(batch=2, tokens=128):
    return torch.randint(3, 512, (batch, tokens), generator=torch.Generator().manual_seed(0))


def test_transformer_logits_in_bf16_on_the_gpu_match_float64_on_the_cpu():
    torch.manual_seed(0)
    model = perturbed(build_model(TransformerConfig(**COMMON)))
    ids = _ids()
    with torch.no_grad():
        exact = model.double().logits(ids)
        gpu = model.to("cuda", torch.bfloat16).logits(ids.cuda()).double().cpu()
    err = (gpu - exact).abs().max() / exact.abs().max()
    assert err < 3e-2, f"bf16 logits deviate by {err:.3g} of their range"
    assert (gpu.argmax(-1) == exact.argmax(-1)).float().mean() > 0.9


def test_flash_attention_agrees_with_the_math_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = perturbed(build_model(TransformerConfig(**COMMON))).to("cuda", torch.bfloat16)
    ids = _ids().cuda()
    with torch.no_grad():
        with sdpa_kernel(SDPBackend.MATH):
            reference = model.logits(ids).float()
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash cannot run these shapes
            flash = model.logits(ids).float()
    assert (flash - reference).abs().max() / reference.abs().max() < 2e-2


def test_calm_hidden_states_and_head_samples_on_the_gpu():
    torch.manual_seed(0)
    cfg = CALMConfig(**COMMON, k=4, latent_dim=32, head=HeadConfig(noise_size=16, num_blocks=1))
    model = perturbed(build_model(cfg))
    ids = _ids(tokens=64)
    with torch.no_grad():
        exact = model.double().hidden_states(ids)
        model = model.to("cuda", torch.bfloat16)
        gpu = model.hidden_states(ids.cuda())
        samples = model.head.sample(gpu[:, -1], 8)
    err = (gpu.double().cpu() - exact).abs().max() / exact.abs().max()
    assert err < 3e-2, f"bf16 hidden states deviate by {err:.3g} of their range"
    assert samples.shape == (2, 8, 32) and samples.is_cuda and torch.isfinite(samples).all()


def test_the_trainer_runs_bf16_on_the_gpu(tmp_path):
    from calm_pretrain.train_command import run_training
    from tests.helpers.data import write_latent_dataset

    rng = np.random.default_rng(0)
    write_latent_dataset(tmp_path / "latents", rng.integers(3, 4096, (32, 256)),
                         rng.standard_normal((32, 64, 64)).astype(np.float32),
                         np.full((32, 64, 64), -2.0, np.float32), k=4)
    run = tmp_path / "run"
    cfg = load_config(str(Path(__file__).parents[1] / "configs/tiny/calm.yaml"), [f"data.train=[{tmp_path / 'latents'}]", f"train.output_dir={run}",
                                                 "train.precision=bf16", "train.engine=torch", "train.max_steps=6",
                                                 "train.log_every=1", "train.save_every=6", "train.wandb=off"])
    assert run_training(cfg, log=print) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(np.isfinite(r["loss"]) and r["memory_gb"] > 0 for r in records)
    assert "device cuda" in (run / "ranks.txt").read_text()


def test_a_background_save_copies_device_state_to_pinned_host_memory(tmp_path):
    """train.async_save on a GPU: the snapshot is taken from the device into pinned host memory before
    save returns, so changing the device tensors afterwards does not reach the file."""
    from calm_pretrain.train.checkpoint import Checkpointer, verify_checkpoint
    from calm_pretrain.parallel.hashed_writes import hashed_save

    class DeviceEngine:
        kind = "torch"

        def __init__(self):
            self.w = torch.arange(1 << 20, dtype=torch.float32, device="cuda")

        def save(self, path: Path) -> None:
            path.mkdir(parents=True, exist_ok=True)
            hashed_save({"w": self.w, "view": self.w[1::2]}, path / "engine.pt")

    ck, engine = Checkpointer(tmp_path, log=lambda s: None), DeviceEngine()
    expected = engine.w.cpu().clone()
    final = ck.save(1, engine, {}, background=True)
    engine.w.mul_(-1.0)  # the next steps change the device state
    assert ck.finish_pending() == final and verify_checkpoint(final) is None
    saved = torch.load(final / "engine" / "engine.pt", map_location="cpu")
    assert torch.equal(saved["w"], expected) and torch.equal(saved["view"], expected[1::2])
    assert ck._buffers._free and all(b.is_pinned() for bufs in ck._buffers._free.values() for b in bufs)
