import pytest
import torch

from calm_pretrain.models.autoencoder import AutoencoderConfig
from calm_pretrain.models.calm import CALMConfig, HeadConfig
from calm_pretrain.models.transformer import TransformerConfig
from calm_pretrain.models import build_model
from calm_pretrain.brier import evaluate_brier
from data_pipeline.evalset import eval_blocks
from data_pipeline.tokenizers import load_tokenizer
from tests.helpers.brier import brierlm_of, exact_lm_brier_1


def _tiny(vocab):
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=2,
                  max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    calm = build_model(CALMConfig(**common, k=4, latent_dim=8, head=HeadConfig(noise_size=8, num_blocks=1)))
    ae = build_model(AutoencoderConfig(k=4, latent_dim=8, vocab_size=vocab, hidden_size=32, intermediate_size=48,
                                       pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    return calm, ae, build_model(TransformerConfig(**common))


def test_wikitext_blocks_score_with_brierlm(shared_data):
    tok = load_tokenizer("demo")
    path = str(shared_data / "wikitext103_test_documents.jsonl")
    blocks = eval_blocks(path, tok, 64, max_blocks=3)
    assert len(blocks) == 3 and all(b.shape == (1, 64) for b in blocks)
    text = tok.decode(torch.cat(blocks, 1)[0].tolist())
    assert " the " in text  # real English came through
    torch.manual_seed(0)
    calm, ae, tr = _tiny(tok.vocab_size)
    for model, kwargs in ((calm, {"ae": ae}), (tr, {})):
        with torch.no_grad():
            result = evaluate_brier(model.eval(), blocks[:2], generator=torch.Generator().manual_seed(0), **kwargs)
        assert result["num_blocks"] == 2
        assert result["brierlm"] == pytest.approx(brierlm_of(result), abs=1e-9)
        if model is tr:  # the Transformer's Brier-1 is exact: its softmax, by hand
            assert result["brier_1"] == pytest.approx(exact_lm_brier_1(tr, eval_blocks(path, tok, 64, max_blocks=2)), rel=1e-6)
