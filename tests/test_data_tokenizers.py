"""Tokenizers: the demo BPE, the Llama-3 tokenizer from its tiktoken ranks, AutoTokenizer directories."""
import json

import pytest
import transformers

from data_pipeline.tokenizers import build_demo_tokenizer, demo_tokenizer_dir, load_tokenizer
from tests.helpers.data import corpus_documents

TEXT = ("The quick brown fox — naïve café, 12345 + 6.02e23; <|end_of_text|> is text here.\n\n"
        "def f(x):\n    return x ** 2  # 中文 ✓\r\n\tTabs   and   spaces  ")

# Meta's Llama-3 split pattern, as published in the reference tokenizer (llama/tokenizer.py).
META_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                       r"\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.fixture(scope="module")
def demo_dir():
    """The demo tokenizer's directory (built by build_demo_tokenizer on first use, then cached)."""
    load_tokenizer("demo")
    return demo_tokenizer_dir()


def test_demo_tokenizer(demo_dir):
    tok = load_tokenizer(str(demo_dir))
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (4096, 0, 1, 2)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT  # byte-level: lossless
    assert 2 not in ids  # a literal "<|end_of_text|>" in a document is text, not the EOS id
    assert max(ids) < 4096 and len(ids) < len(TEXT.encode())
    # the cached "demo" spec is the same tokenizer (same Python, same standard library)
    demo = load_tokenizer("demo")
    assert demo.fingerprint == tok.fingerprint and demo.encode(TEXT) == ids
    assert tok.encode_batch([TEXT, "", "a"]) == [ids, [], tok.encode("a")]
    assert tok.describe()["fingerprint"] == tok.fingerprint


def test_demo_directory_loads_with_autotokenizer(demo_dir):
    hf = transformers.AutoTokenizer.from_pretrained(str(demo_dir))
    ours = load_tokenizer(str(demo_dir))
    plain = TEXT.replace("<|end_of_text|>", "")
    assert hf(plain, add_special_tokens=False)["input_ids"] == ours.encode(plain)
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)


def real_text(shared_data, n_corpus=60, n_wiki=5):
    wiki = [json.loads(line)["text"] for line in open(shared_data / "wikitext103_test_documents.jsonl")][:n_wiki]
    corpus = list(corpus_documents(shared_data / "corpus_mixed_en.jsonl.zst", n_corpus, skip=0))
    corpus += list(corpus_documents(shared_data / "corpus_mixed_en.jsonl.zst", n_corpus, skip=12000))
    return wiki + corpus + [TEXT]


def test_llama3_ids_match_tiktoken(shared_data):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    from data_pipeline.tokenizers import HFTokenizer, llama3_hf_backend

    d = shared_data / "llama3_tokenizer"
    tok = load_tokenizer(f"llama3:{d}")
    assert tok.vocab_size == 128257
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (128000, 128001, 128256)
    ranks = load_tiktoken_bpe(str(d / "tokenizer.model"))
    ref = tiktoken.Encoding("llama3-reference", pat_str=META_LLAMA3_PATTERN, mergeable_ranks=ranks,
                            special_tokens={"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001})
    texts = real_text(shared_data)
    assert sum(map(len, texts)) > 500_000
    expected = [ref.encode_ordinary(t) for t in texts]
    assert tok.encode_batch(texts) == expected
    # the `tokenizers` BPE built from the same ranks (what save_llama3_hf writes for AutoTokenizer)
    hf = HFTokenizer(llama3_hf_backend(d), "llama3-hf", "llama3-bpe", "<|begin_of_text|>", "<|end_of_text|>", "[PAD]")
    assert hf.encode_batch(texts) == expected
    assert hf.vocab_size == 128257 and hf.pad_id == 128256
    # specials: names and ids from 128000 to 128255, [PAD] after them
    assert tok.specials["<|reserved_special_token_250|>"] == 128255 and tok.specials["<|eot_id|>"] == 128009
    assert tok.decode([128000] + expected[0][:20]) == "<|begin_of_text|>" + ref.decode(expected[0][:20])
    assert tok.decode(expected[-1]) == TEXT


def test_llama3_name_resolution(shared_data):
    tok = load_tokenizer(str(shared_data / "llama3_tokenizer"))  # a directory with tokenizer.model only
    assert tok.kind == "llama3-tiktoken" and tok.vocab_size == 128257


def test_fingerprints_identify_tokenizers(demo_dir, shared_data):
    demo = load_tokenizer(str(demo_dir))
    llama = load_tokenizer(f"llama3:{shared_data / 'llama3_tokenizer'}")
    assert demo.fingerprint != llama.fingerprint
    assert load_tokenizer(f"llama3:{shared_data / 'llama3_tokenizer'}").fingerprint == llama.fingerprint


def test_build_demo_tokenizer_into_a_directory(tmp_path, monkeypatch, demo_dir):
    """Training is deterministic: a fresh build equals the cached one (a small corpus keeps this fast)."""
    import pydoc_data.topics

    import data_pipeline.tokenizers as t

    small = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:40]]
    monkeypatch.setattr(t, "stdlib_corpus", lambda: small)
    a = build_demo_tokenizer(tmp_path / "a", vocab_size=600)
    b = build_demo_tokenizer(tmp_path / "b", vocab_size=600)
    assert a.fingerprint == b.fingerprint and a.vocab_size == 600 and (a.pad_id, a.bos_id, a.eos_id) == (0, 1, 2)
    assert load_tokenizer(str(tmp_path / "a")).encode(TEXT) == a.encode(TEXT)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["calm_tokenizer.json", "tokenizer.json",
                                                                  "tokenizer_config.json"]


def test_unknown_tokenizer_is_a_clear_error(tmp_path):
    from data_pipeline.errors import DataError

    with pytest.raises(DataError, match="cannot load tokenizer"):
        load_tokenizer(str(tmp_path / "no-such-tokenizer"))
