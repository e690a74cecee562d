"""The Transformer baseline's release adapter: an HF ``LlamaForCausalLM`` (docs/release.md, 'Transformer
baseline'): ``config.json`` with ``model_type: llama`` and ``head_dim``; ``transformer.*`` → ``model.*``,
``lm_head.weight`` keeps its name."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from calm_pretrain.models import backbone_release as backbone
from calm_pretrain.models.release_layout import ReleaseAdapter, ReleaseError, few, require_keys

ARCH_LLAMA = "LlamaForCausalLM"
PREFIX_MAP = [("transformer.", "model."), ("lm_head.", "lm_head.")]  # (ours, release)


class TransformerRelease(ReleaseAdapter):
    published_names = (ARCH_LLAMA,)
    model_types = ("llama",)

    def known_config_keys(self, name: str) -> set[str]:
        return set(backbone.KNOWN_KEYS)

    def release_config(self, cfg) -> dict:
        # HF reads model_type to pick the class; the reference CALM configs must not carry it
        # (docs/release.md, 'CALM config.json').
        return {**backbone.release_config(cfg), "model_type": "llama", "head_dim": cfg.hidden_size // cfg.num_heads}

    def config_dict(self, values: dict, name: str, base: dict, cfg_path: Path) -> dict:
        require_keys(values, backbone.BACKBONE_REQUIRED, cfg_path)
        return {**base, **backbone.config_dict(values, base, cfg_path), "arch": "transformer"}

    def generation_config(self, cfg) -> dict:
        return backbone.generation_config(cfg)

    def to_release_name(self, name: str) -> str:
        for ours, theirs in PREFIX_MAP:
            if name.startswith(ours):
                return theirs + name[len(ours):]
        return name

    def from_release_name(self, name: str) -> Optional[str]:
        """Our name for a release name, or None when it has no counterpart."""
        for ours, theirs in PREFIX_MAP:
            if name.startswith(theirs):
                return ours + name[len(theirs):]
        return None

    def from_release(self, tensors: dict, where: str, name: str, tie_word_embeddings: bool = False):
        # Older HF files carry RoPE's inv_freq (recomputed from the config, never a weight).
        tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
        if tie_word_embeddings and "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        ours, unknown = {}, []
        for k, v in tensors.items():
            mine = self.from_release_name(k)
            if mine is None:
                unknown.append(k)
            else:
                ours[mine] = v
        if unknown:
            raise ReleaseError(f"{where}: unexpected {len(unknown)} tensor(s): {few(sorted(unknown))}")
        return ours, None

    def card_rows(self, cfg) -> list[tuple]:
        return backbone.card_rows(cfg)


RELEASE = TransformerRelease()
