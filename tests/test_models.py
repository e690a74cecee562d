import pytest
import torch
import transformers

from calm_pretrain.config import AutoencoderConfig, CALMConfig, HeadConfig, TransformerConfig, load_config
from calm_pretrain.models import build_model, count_config_parameters
from tests.helpers import REPO

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=4,
            max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def spec_calm_params(v, h, i, layers, k=4, m=4, noise=64, latent=128):
    """The closed form of docs/release.md, 'Parameter count' (MHA), independent of the module code."""
    backbone = v * h + layers * (4 * h * h + 3 * h * i + 2 * h) + h
    embed_proj = (2 * k + 2) * h * h + 5 * h
    head = (2 + 6 * m) * h * h + (noise + 9 + 7 * m) * h + latent * (h + 1)
    return backbone + embed_proj + head


def test_published_parameter_counts():
    calm_m = count_config_parameters(load_config(REPO / "configs/calm/calm_m.yaml").model)
    assert calm_m["total"] == 371_732_608 == spec_calm_params(128257, 1024, 2752, 16)
    # The spec's CALM-M breakdown: layers 202M, input embedding 131M, embed_proj 10.5M, head 27.5M.
    assert round(calm_m["backbone layers"] / 1e6) == 202
    assert round(calm_m["input embedding"] / 1e6) == 131
    assert round(calm_m["input compression"] / 1e5) == 105
    assert round(calm_m["head"] / 1e5) == 275
    calm_l = count_config_parameters(load_config(REPO / "configs/calm/calm_l.yaml").model)
    assert calm_l["total"] == 735_332_480 == spec_calm_params(128257, 1536, 4096, 16)
    calm_xl = count_config_parameters(load_config(REPO / "configs/calm/calm_xl.yaml").model)
    assert abs(calm_xl["total"] / 1.82e9 - 1) < 0.01
    ts = count_config_parameters(load_config(REPO / "configs/transformer/transformer_s.yaml").model)
    assert round(ts["total"] / 1e6) == 282
    tm = count_config_parameters(load_config(REPO / "configs/transformer/transformer_m.yaml").model)
    assert round(tm["total"] / 1e6) == 465
    tl = count_config_parameters(load_config(REPO / "configs/transformer/transformer_l.yaml").model)
    assert round(tl["total"] / 1e6) == 847
    ae = count_config_parameters(load_config(REPO / "configs/ae/ae_k4_d128.yaml").model)
    assert ae["total"] == 75_832_064  # the tied embedding counts once
    assert ae["token embedding (tied)"] == 128257 * 512


def test_backbone_matches_hf_llama():
    """Our Llama blocks against transformers' own LlamaModel with the same weights (an independent implementation)."""
    torch.manual_seed(0)
    cfg = TransformerConfig(**{**TINY, "num_kv_heads": 2})  # grouped-query attention
    ours = build_model(cfg).eval()
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_position_embeddings,
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False)
    hf_cfg._attn_implementation = "eager"
    hf = transformers.LlamaModel(hf_cfg).eval()
    state = {k[len("transformer."):]: v for k, v in ours.state_dict().items() if k.startswith("transformer.")}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        ref = hf(input_ids=ids).last_hidden_state
        got = ours.transformer(ours.transformer.embed_tokens(ids))
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_kv_cache_equals_full_forward(kv_heads):
    torch.manual_seed(0)
    calm = build_model(CALMConfig(**{**TINY, "num_kv_heads": kv_heads}, k=4, latent_dim=16,
                                  head=HeadConfig(noise_size=8, num_blocks=1))).eval()
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        full = calm.hidden_states(ids)
        cache = calm.new_cache()
        parts = [calm.hidden_states(ids[:, a:b], cache) for a, b in [(0, 16), (16, 20), (20, 40)]]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_calm_is_causal_over_chunks_and_predicts_the_next_chunk():
    torch.manual_seed(0)
    cfg = CALMConfig(**TINY, k=4, latent_dim=16, head=HeadConfig(noise_size=8, num_blocks=1, num_target_samples=4))
    calm = build_model(cfg).eval()
    ids = torch.randint(0, 512, (1, 32))
    changed = ids.clone()
    changed[0, 20:] = (changed[0, 20:] + 1) % 512  # chunks 5.. differ
    with torch.no_grad():
        a, b = calm.hidden_states(ids), calm.hidden_states(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])
    # The head's output layer starts at zero, so every sample is 0 and the loss only sees the targets.
    mu, log_sigma = torch.randn(1, 8, 16), torch.full((1, 8, 16), -1.0)
    out = calm(ids, mu, log_sigma)
    assert out.hidden.shape == (1, 7, 64) and torch.isfinite(out.loss)
    out.loss.backward()
    assert calm.mlp_generator.final_layer.linears[2].weight.grad.abs().sum() > 0


def test_autoencoder_ties_embedding_and_round_trips_shapes():
    torch.manual_seed(0)
    ae = build_model(AutoencoderConfig(k=4, latent_dim=16, vocab_size=300, hidden_size=32, intermediate_size=64,
                                       pad_token_id=0, bos_token_id=1, eos_token_id=2))
    assert ae.decoder.lm_head_weight is ae.encoder.embed_tokens.weight
    sd = ae.state_dict()
    assert "decoder.lm_head_weight" in sd and "encoder.embed_tokens.weight" in sd  # the release layout has both
    ids = torch.randint(0, 300, (3, 12))
    mu, log_sigma = ae.encode(ids)
    assert mu.shape == log_sigma.shape == (3, 3, 16)
    assert ae.decode(mu).shape == (3, 12, 300)
    with pytest.raises(ValueError, match="multiple of K"):
        ae.encode(ids[:, :10])
    ae.train()
    out = ae(ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and 0 <= out.accuracy <= 1
    assert ae.encoder.embed_tokens.weight.grad is not None


def test_transformer_baseline_loss_is_next_token_cross_entropy():
    torch.manual_seed(0)
    model = build_model(TransformerConfig(**TINY))
    ids = torch.randint(0, 512, (2, 16))
    out = model(ids)
    ref = torch.nn.functional.cross_entropy(model.logits(ids)[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)
    assert abs(out.loss.item() - torch.log(torch.tensor(512.0)).item()) < 0.5  # near uniform at init
