"""The release mapping of the Llama-style decoder backbone, which the CALM and the Transformer baseline
share (docs/release.md, 'CALM config.json', 'Transformer baseline'): its config.json keys, the Llama
features it does not implement, and the generation config of a model that generates."""
from __future__ import annotations

from pathlib import Path

from calm_pretrain.models.release_layout import TRANSFORMERS_VERSION, ReleaseError, check_constants, mapped

BACKBONE_FIELDS = [
    ("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"), ("intermediate_size", "intermediate_size"),
    ("num_hidden_layers", "num_layers"), ("num_attention_heads", "num_heads"),
    ("num_key_value_heads", "num_kv_heads"), ("rms_norm_eps", "norm_eps"), ("rope_theta", "rope_theta"),
    ("max_position_embeddings", "max_position_embeddings"), ("initializer_range", "init_std"),
    ("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "pad_token_id"),
]
# Llama features our backbone does not implement: the exporter writes these values and the importer
# refuses any other (loading would silently compute something else).
LLAMA_CONSTANTS = {"hidden_act": "silu", "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
                   "mlp_bias": False, "pretraining_tp": 1, "use_cache": True, "tie_word_embeddings": False}
BACKBONE_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

KNOWN_KEYS = {k for k, _ in BACKBONE_FIELDS} | set(LLAMA_CONSTANTS)


def release_config(cfg) -> dict:
    return {**{key: getattr(cfg, ours) for key, ours in BACKBONE_FIELDS}, **LLAMA_CONSTANTS}


def config_dict(values: dict, base: dict, cfg_path: Path) -> dict:
    """Our backbone fields from a Llama-style config.json (the required keys are checked by the caller)."""
    check_constants(values, LLAMA_CONSTANTS, cfg_path)
    heads, hidden = values["num_attention_heads"], values["hidden_size"]
    if values.get("head_dim") is not None and values["head_dim"] * heads != hidden:
        raise ReleaseError(f"{cfg_path}: head_dim = {values['head_dim']} with {heads} heads does not give "
                           f"hidden_size {hidden} (not supported)")
    out = mapped(values, BACKBONE_FIELDS)
    out.setdefault("num_kv_heads", heads)  # HF: a missing num_key_value_heads means MHA
    rope = values.get("rope_parameters")  # transformers >= 5 writes rope_theta inside this dict
    if isinstance(rope, dict):
        if rope.get("rope_type", "default") != "default":
            raise ReleaseError(f"{cfg_path}: rope_parameters {rope} are not supported (only plain RoPE)")
        if rope.get("rope_theta") is not None:
            out["rope_theta"] = rope["rope_theta"]
    if values.get("pad_token_id") is None and "pad_token_id" not in base and "eos_token_id" in out:
        out["pad_token_id"] = out["eos_token_id"]  # HF Llamas often have no pad: pad with eos, as usual
    return out


def generation_config(cfg) -> dict:
    return {"_from_model_config": True, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
            "pad_token_id": cfg.pad_token_id, "transformers_version": TRANSFORMERS_VERSION}


def card_rows(cfg) -> list[tuple]:
    return [("layers", cfg.num_layers), ("hidden / FFN", f"{cfg.hidden_size} / {cfg.intermediate_size}"),
            ("attention heads / KV heads", f"{cfg.num_heads} / {cfg.num_kv_heads}"),
            ("context (positions)", cfg.max_position_embeddings)]
