import pytest
import torch
import transformers

from calm_pretrain.config import load_config
from calm_pretrain.models.autoencoder import AutoencoderConfig
from calm_pretrain.models.calm import CALMConfig, HeadConfig
from calm_pretrain.models.transformer import TransformerConfig
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


def spec_transformer_params(v, h, i, layers):
    """Llama with MHA and an untied output embedding: input + output embedding, per layer 4h² attention,
    3hi SwiGLU and two norms, one final norm (the head count does not change an MHA count)."""
    return 2 * v * h + layers * (4 * h * h + 3 * h * i + 2 * h) + h


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
    # The published figures are whole millions cut, not rounded: CALM-M, 371,732,608 here as in the
    # reference code, is published as 371M (docs/method.md, 'Published results').
    assert (int(calm_m["total"] / 1e6), int(calm_l["total"] / 1e6)) == (371, 735)
    ts = count_config_parameters(load_config(REPO / "configs/transformer/transformer_s.yaml").model)
    # Transformer-S (reference-code dims): 2 × 98,501,376 untied embeddings + 84,953,856 in the layers
    # = 281,956,608, published as 281M by the same cut (rounded it would read 282M; a tied embedding
    # would give 183,455,232).
    assert ts["total"] == 281_956_608 == spec_transformer_params(128257, 768, 2048, 12)
    assert ts["input embedding"] == ts["output embedding"] == 128257 * 768
    assert int(ts["total"] / 1e6) == 281, "the published Transformer-S count"
    tm = count_config_parameters(load_config(REPO / "configs/transformer/transformer_m.yaml").model)
    assert tm["total"] == 465_079_296 == spec_transformer_params(128257, 1024, 2752, 16)
    assert int(tm["total"] / 1e6) == 465, "the published Transformer-M count"
    tl = count_config_parameters(load_config(REPO / "configs/transformer/transformer_l.yaml").model)
    # Transformer-L: the published work gives only "~849M", no dimensions; ours are inferred as CALM-L's
    # backbone (H 1536, FFN 4096 = 8/3·H, 16 layers): 2 × 197,002,752 embeddings + 453,035,520 in the
    # layers = 847,041,024, 1.96M (0.23%) below 849M. No nearby Llama shape lands on 849M: the next FFN
    # multiples of 64 give 842,322,432 (4032) and 851,759,616 (4160), a tied embedding 650,038,272, and
    # the head count does not enter an MHA count. So the inferred count is pinned, and kept within 0.3%.
    assert tl["total"] == 847_041_024 == spec_transformer_params(128257, 1536, 4096, 16)
    assert abs(tl["total"] / 849e6 - 1) < 0.003, "within the published '~849M'"
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
    # The training forward (token masking, latent noise and dropout, all seeded) against a by-hand
    # float64 computation: cross-entropy over the logits it returns, accuracy counted token by token, and
    # the tied embedding's gradient against a central finite difference of the same seeded loss.
    import math

    ae = ae.double().train()

    def seeded_loss():
        torch.manual_seed(1)
        return ae(ids)

    out = seeded_loss()
    out.loss.backward()
    logits, flat = out.logits.detach().reshape(-1, 300).tolist(), ids.reshape(-1).tolist()
    nll = [max(z) + math.log(sum(math.exp(v - max(z)) for v in z)) - z[y] for z, y in zip(logits, flat)]
    assert abs(out.ce.item() - sum(nll) / len(nll)) < 1e-6 * out.ce.item()  # the model's CE runs in float32
    assert out.accuracy.item() == sum(z.index(max(z)) == y for z, y in zip(logits, flat)) / len(flat)
    weight = ae.encoder.embed_tokens.weight
    direction = torch.randn(weight.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    eps = 1e-3  # the float32 CE rounds the loss to ~1e-6: a step this size keeps that below 1e-3 of the slope
    with torch.no_grad():
        weight.add_(eps * direction)
        up = seeded_loss().loss.item()
        weight.sub_(2 * eps * direction)
        down = seeded_loss().loss.item()
        weight.add_(eps * direction)
    slope = (weight.grad * direction).sum().item()
    assert slope != 0 and abs((up - down) / (2 * eps) - slope) < 1e-2 * abs(slope), ((up - down) / (2 * eps), slope)


def test_transformer_baseline_loss_is_next_token_cross_entropy():
    """The loss against a computation that shares nothing with the model's: a float64 copy of the model
    reads each prefix ids[:, :t+1] alone (so a leak from later tokens or a shift by one shows), and the
    negative log-likelihood of ids[:, t+1] is logsumexp(z) - z[target], summed by hand. PAD (id 0) is
    scored like any other target, as the model does (it has no ignore_index: the lm layout packs
    documents and pads only a corpus's last sample)."""
    import copy
    import math

    torch.manual_seed(0)
    model = build_model(TransformerConfig(**TINY)).eval()
    ids = torch.randint(3, 512, (2, 12))
    ids[1, 8:] = TINY["pad_token_id"]
    with torch.no_grad():
        out = model(ids)
        double = copy.deepcopy(model).double()
        nll = []
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1] - 1):
                z = double.logits(ids[b:b + 1, :t + 1])[0, -1].tolist()  # the last position of the prefix
                top = max(z)
                logsumexp = top + math.log(sum(math.exp(v - top) for v in z))
                nll.append(logsumexp - z[int(ids[b, t + 1])])
    ref = sum(nll) / len(nll)
    assert abs(out.loss.item() - ref) < 1e-5 * ref, (out.loss.item(), ref)
    assert abs(ref - math.log(512)) < 0.5  # near uniform at init
