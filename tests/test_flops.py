"""The FLOPs model against torch's own FLOP counter, a hand count, and the published table."""
import torch
from torch.utils.flop_counter import FlopCounterMode

from calm_pretrain.config import load_config
from calm_pretrain.models.autoencoder import AutoencoderConfig
from calm_pretrain.models.calm import CALMConfig, HeadConfig
from calm_pretrain.models.transformer import TransformerConfig
from calm_pretrain.models.autoencoder.flops import autoencoder_decoder_forward, autoencoder_encoder_forward
from calm_pretrain.models.calm.flops import energy_head_forward
from calm_pretrain.models.registry import inference_flops_per_token, training_flops_per_token
from calm_pretrain.models import build_model
from tests.helpers import REPO

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _counted(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_flop_counts()


def test_head_and_autoencoder_match_torch_flop_counter():
    cfg = CALMConfig(**TINY, k=4, latent_dim=8, head=HeadConfig(num_blocks=3, noise_size=16, num_samples=5))
    calm = build_model(cfg)
    h = torch.randn(7, cfg.hidden_size)
    counts = _counted(lambda: calm.mlp_generator.sample(h, 5))
    assert counts["EnergyHead"][torch.ops.aten.addmm] + counts["EnergyHead"].get(torch.ops.aten.mm, 0) + \
        counts["EnergyHead"].get(torch.ops.aten.bmm, 0) == 7 * energy_head_forward(cfg, 5)

    ae_cfg = AutoencoderConfig(k=4, latent_dim=8, vocab_size=96, hidden_size=32, intermediate_size=48,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    ae = build_model(ae_cfg)
    ids = torch.randint(0, 96, (3, 16))  # 12 chunks
    enc = _counted(lambda: ae.encoder(ids))["Encoder"]
    assert sum(enc.values()) == 12 * autoencoder_encoder_forward(ae_cfg)
    z = torch.randn(3, 4, 8)
    dec = _counted(lambda: ae.decoder(z))["Decoder"]
    assert sum(dec.values()) == 12 * autoencoder_decoder_forward(ae_cfg)


def test_backbone_matmuls_match_torch_flop_counter():
    cfg = TransformerConfig(**TINY)
    model = build_model(cfg)
    t = 10
    ids = torch.randint(0, 96, (1, t))
    counts = _counted(lambda: model.logits(ids))["Global"]
    linear = sum(v for op, v in counts.items() if "attention" not in str(op))  # attention is counted apart
    per_pos = training_flops_per_token(cfg, context=0).total / 3  # context 0: projections and MLP only
    assert linear == t * per_pos


def test_hand_count_of_a_one_layer_transformer():
    cfg = TransformerConfig(vocab_size=10, hidden_size=4, intermediate_size=8, num_layers=1, num_heads=2,
                            num_kv_heads=1, max_position_embeddings=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    # q,o: 2·4·4 each; k,v: 2·4·2 each (one kv head of dim 2); MLP 3·2·4·8; attention 2·6·4; lm_head 2·4·10
    forward = (32 + 32 + 16 + 16) + 192 + 48 + 80
    assert training_flops_per_token(cfg, context=6).total == 3 * forward
    assert inference_flops_per_token(cfg, context=6).total == forward


def test_published_flops_table_within_ten_percent():
    """docs/method.md, 'Published results': training FLOPs (250k steps × 2^21 tokens) and inference FLOPs
    per token."""
    ae = load_config(REPO / "configs/ae/ae_k4_d128.yaml").model
    tokens = 250_000 * 2 ** 21
    for path, train_pub, infer_pub in [("calm/calm_m.yaml", 3.7e20, 2.9e8),
                                        ("transformer/transformer_s.yaml", 6.6e20, 4.4e8)]:
        cfg = load_config(REPO / "configs" / path).model
        train = training_flops_per_token(cfg, 2048, ae).total * tokens
        infer = inference_flops_per_token(cfg, 2048, ae).total
        assert abs(train / train_pub - 1) < 0.10, (path, train)
        assert abs(infer / infer_pub - 1) < 0.10, (path, infer)


def test_hand_count_of_the_autoencoder_share():
    """The AE as the paper's table counts it for CALM: its encoder's forward per chunk in training (it makes
    the targets), its decoder's forward per generated chunk at inference, both spread over the K tokens."""
    ae = AutoencoderConfig(k=2, latent_dim=3, vocab_size=10, hidden_size=4, intermediate_size=8,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    layer = 3 * 2 * 4 * 8  # one AELayer: SwiGLU gate/up/down 4→8→4
    # encoder per chunk: 1 layer per token (×K), squeeze K·4→4, 1 layer, μ/logσ head 4→2·3
    encoder = 2 * layer + 2 * 8 * 4 + layer + 2 * 4 * 6
    # decoder per chunk: 3→4, 1 layer, expand 4→K·4, 1 layer per token (×K), tied logits 4→10 per token (×K)
    decoder = 2 * 3 * 4 + layer + 2 * 4 * 8 + 2 * layer + 2 * 2 * 4 * 10
    assert (encoder, decoder) == (688, 824)
    assert autoencoder_encoder_forward(ae) == encoder and autoencoder_decoder_forward(ae) == decoder

    calm = CALMConfig(**TINY, k=2, latent_dim=3, head=HeadConfig(num_blocks=1, noise_size=4, num_samples=2,
                                                                 num_target_samples=3))
    train_with, train_without = training_flops_per_token(calm, 8, ae), training_flops_per_token(calm, 8)
    assert train_with.parts["autoencoder"] == encoder / 2  # forward only: the AE is frozen
    assert train_with.total - train_without.total == encoder / 2
    assert "autoencoder" not in train_without.parts
    infer_with, infer_without = inference_flops_per_token(calm, 8, ae), inference_flops_per_token(calm, 8)
    assert infer_with.parts["autoencoder"] == decoder / 2
    assert infer_with.total - infer_without.total == decoder / 2
    # The AE's own training (its sweep stage): forward + backward of encoder and decoder, per token.
    assert training_flops_per_token(ae, 0).total == 3 * (encoder + decoder) / 2
