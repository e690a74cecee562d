"""Small models and tokenizers that tests make for themselves, and a plain AdamW loop that trains a
small autoencoder (tests and tools/bench_data.py)."""
from __future__ import annotations

import numpy as np


def tiny_model(name: str, *overrides):
    """configs/tiny/<name>.yaml (with dotted overrides) built with torch's seed 0, in eval mode."""
    import torch

    from calm_pretrain.config import load_config
    from calm_pretrain.models import build_model
    from tests.helpers import REPO

    torch.manual_seed(0)
    return build_model(load_config(REPO / f"configs/tiny/{name}.yaml", list(overrides)).model).eval()


def tiny_bpe(texts: list[str], vocab_size: int):
    """A small byte-level BPE with the demo tokenizer's specials, trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models as tk_models, pre_tokenizers, trainers

    from data_pipeline.tokenizers import DEMO_SPECIALS, HFTokenizer

    tk = Tokenizer(tk_models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=DEMO_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tk, "tiny", "tiny-bpe", DEMO_SPECIALS[1], DEMO_SPECIALS[2], DEMO_SPECIALS[0])


def perturbed(model):
    """Random values everywhere (eval mode): unit norms and the zero-initialised head output would hide mistakes."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def tiny_ae_config(**overrides):
    """A small AutoencoderConfig (demo vocabulary, pad 0, bos 1, eos 2)."""
    from calm_pretrain.models.autoencoder import AutoencoderConfig

    values = dict(k=4, latent_dim=16, vocab_size=4096, hidden_size=32, intermediate_size=64, num_encoder_layers=2,
                  num_decoder_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    values.update(overrides)
    return AutoencoderConfig(**values)


def train_autoencoder(ae, batches: np.ndarray, steps: int, lr: float = 2e-3, seed: int = 0,
                      log_every: int = 0) -> list[float]:
    """A plain AdamW loop on ae(ids).loss over random rows of `batches` [n, T]; returns the accuracies."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    ae.train().requires_grad_(True)
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=0.0)
    accs = []
    for step in range(steps):
        rows = rng.integers(0, len(batches), size=min(16, len(batches)))
        out = ae(torch.from_numpy(batches[rows].astype(np.int64)))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        accs.append(float(out.accuracy))
        if log_every and (step + 1) % log_every == 0:
            print(f"  ae step {step + 1}: loss {out.loss.item():.3f} acc {accs[-1]:.4f}", flush=True)
    ae.eval().requires_grad_(False)
    return accs
