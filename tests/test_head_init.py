"""Width-aware head init: narrow and wide CALMs start with the same sensitivity to their condition.

Sensitivity is measured on the real model built by `build_model` (so through CALM.reset_parameters):
two independent conditions h, h' with the same noise, the relative change of the energy head's
residual stream ‖x(h) − x(h')‖ / ‖x(h)‖ after its last block (the output layer is zero at init).
"""
import math

import pytest
import torch

from calm_pretrain.models.calm import CALMConfig, HeadConfig
from calm_pretrain.models import build_model
from calm_pretrain.models.calm.heads import head_init_std

WIDTHS = (64, 128, 256, 1024)


def calm_at(width: int, reference_width: int = 1024, seed: int = 0):
    torch.manual_seed(seed)
    cfg = CALMConfig(vocab_size=64, hidden_size=width, intermediate_size=2 * width, num_layers=1, num_heads=4,
                     num_kv_heads=4, max_position_embeddings=16, k=4, latent_dim=32,
                     head=HeadConfig(num_blocks=4, noise_size=64, init_reference_width=reference_width))
    return build_model(cfg)


def sensitivity(model, positions: int = 64, samples: int = 8) -> float:
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(positions, model.config.hidden_size, generator=gen)
    h2 = torch.randn(positions, model.config.hidden_size, generator=gen)
    noise = torch.rand(positions, samples, model.config.head.noise_size, generator=gen) - 0.5
    with torch.no_grad():
        x, x2 = model.head.residual_stream(h, noise), model.head.residual_stream(h2, noise)
    return float((x - x2).norm() / x.norm())


def test_head_init_std_rule():
    assert head_init_std(0.02, 1024, 1024) == 0.02  # CALM-M: the published value, exactly
    assert head_init_std(0.02, 1536, 1024) == 0.02  # wider published sizes too
    assert head_init_std(0.02, 128, 0) == 0.02  # scaling switched off
    assert head_init_std(0.02, 128, 1024) == pytest.approx(0.02 * math.sqrt(8))


def test_sensitivity_to_the_condition_is_width_independent():
    scaled = {w: sensitivity(calm_at(w)) for w in WIDTHS}
    assert max(scaled.values()) / min(scaled.values()) < 3, scaled
    # Without the rule the narrow heads are orders of magnitude less sensitive (the problem it fixes),
    # so this test would fail if the rule were not applied.
    plain = {w: sensitivity(calm_at(w, reference_width=0)) for w in WIDTHS}
    assert plain[1024] == pytest.approx(scaled[1024], rel=1e-6)
    assert plain[1024] / plain[128] > 30, plain


def test_published_width_keeps_the_published_draws():
    a, b = calm_at(1024), calm_at(1024, reference_width=0)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    w = calm_at(128).head.mlp_blocks[0].down_proj.weight.detach()
    assert float(w.std()) == pytest.approx(0.02 * math.sqrt(8), rel=0.05)
