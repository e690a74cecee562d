"""Short CPU training runs on real English text: the models learn what the method says they learn.

Text: the Python documentation topics shipped with every Python (`pydoc_data.topics`), as UTF-8
bytes (vocabulary 256 + PAD + EOS), so the test needs nothing beyond the standard library.
Held-out text: the last 10% of topics, never trained on.
"""
import math

import pydoc_data.topics
import pytest
import torch

from calm_pretrain.models.autoencoder import AutoencoderConfig
from calm_pretrain.models.calm import CALMConfig, HeadConfig
from calm_pretrain.models import build_model

K, SEQ_CHUNKS, PAD, EOS, VOCAB = 4, 32, 256, 257, 258


def _byte_blocks(texts, length):
    data = "\n".join(texts).encode()
    n = len(data) // length
    return torch.tensor(list(data[: n * length]), dtype=torch.long).view(n, length)


@pytest.fixture(scope="module")
def text_blocks():
    docs = list(pydoc_data.topics.topics.values())
    split = len(docs) * 9 // 10
    return _byte_blocks(docs[:split], SEQ_CHUNKS * K), _byte_blocks(docs[split:], SEQ_CHUNKS * K)


def _train(model, batches, steps, lr, loss_fn):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    losses = []
    for step in range(steps):
        # linear warm-up over 20 steps, cosine decay to 10%
        scale = min(1.0, (step + 1) / 20) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        loss = loss_fn(model, batches(step))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def trained_ae(text_blocks):
    train, _ = text_blocks
    torch.manual_seed(0)
    cfg = AutoencoderConfig(k=K, latent_dim=64, vocab_size=VOCAB, hidden_size=256, intermediate_size=640,
                            pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS)
    ae = build_model(cfg)
    gen = torch.Generator().manual_seed(1)
    _train(ae, lambda s: train[torch.randint(0, len(train), (16,), generator=gen)], 300, 2e-3,
           lambda m, ids: m(ids).loss)
    return ae.eval()


@pytest.mark.slow
def test_tiny_autoencoder_reconstructs_held_out_text(trained_ae, text_blocks):
    _, held_out = text_blocks
    with torch.no_grad():
        recon = trained_ae.reconstruct(held_out)
    accuracy = (recon == held_out).float().mean().item()
    assert accuracy >= 0.99, f"held-out token reconstruction {accuracy:.4f} < 0.99"


@pytest.mark.slow
def test_tiny_calm_learns_to_use_its_context(trained_ae, text_blocks):
    from calm_pretrain.eval.heldout import evaluate_model

    train, held_out = text_blocks
    with torch.no_grad():
        mu, log_sigma = trained_ae.encode(train)
    torch.manual_seed(0)
    cfg = CALMConfig(k=K, latent_dim=64, vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_layers=2,
                     num_heads=4, num_kv_heads=4, max_position_embeddings=SEQ_CHUNKS, pad_token_id=PAD,
                     eos_token_id=EOS, bos_token_id=EOS,
                     head=HeadConfig(num_blocks=2, noise_size=32, num_samples=8, num_target_samples=32))
    calm = build_model(cfg)
    blocks = [held_out[i:i + 1] for i in range(min(64, len(held_out)))]  # one block per row: clustered errors

    def scores(model):
        model.eval()
        result = evaluate_model(model, blocks, ae=trained_ae, seed=0)
        model.train()
        return result

    before = scores(calm)
    gen = torch.Generator().manual_seed(2)

    def batch(step):
        idx = torch.randint(0, len(train), (16,), generator=gen)
        return train[idx], mu[idx], log_sigma[idx]

    losses = _train(calm, batch, 150, 2e-3, lambda m, b: m(*b).loss)
    after = scores(calm)
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < first - 2.0, f"energy loss did not fall: {first:.3f} -> {last:.3f}"
    # Untrained, the zero-initialised head gives identical samples: the collision term is 1 and every
    # Brier-n is near -1, and the energy skill far below 0 (a point mass scores badly against the
    # posterior spread). A short run must lift every Brier-n to the marginal's level and the skill from
    # about -0.46 to near 0. Positive BrierLM and a skill above 0 take longer runs than a unit test
    # (the main job reports both; docs/learning_study.md measures them).
    for n in range(1, 5):
        b0, b1 = before[f"brier_{n}"], after[f"brier_{n}"]
        assert b1 > b0 + 0.5, f"Brier-{n} did not rise: {b0:.3f} -> {b1:.3f}"
    assert before["energy_skill"] < -0.3, before
    assert after["energy_skill"] > -0.1 and after["energy_skill"] > before["energy_skill"] + 0.3, after
