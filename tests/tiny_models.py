"""Small models and tokenizers that tests make for themselves."""


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
