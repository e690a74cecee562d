"""The config of the Llama-style decoder that CALM and the Transformer baseline share."""
from __future__ import annotations

from dataclasses import dataclass

from calm_pretrain.schema import check


@dataclass
class BackboneConfig:
    """A Llama-style decoder (RoPE, SwiGLU, RMSNorm, optional GQA). Defaults are CALM-M's."""

    vocab_size: int = 128257
    hidden_size: int = 1024
    intermediate_size: int = 2752
    num_layers: int = 16
    num_heads: int = 16
    num_kv_heads: int = 16
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-6
    init_std: float = 0.02
    pad_token_id: int = 128256
    eos_token_id: int = 128001
    bos_token_id: int = 128000

    tokens_per_position = 1  # CALM overrides it with K

    def validate_parallel(self, tensor: int, pipeline: int) -> None:
        """Tensor parallelism splits attention heads and the MLP; pipeline stages hold whole layers."""
        check(self.num_layers >= pipeline, "parallel.pipeline",
              f"= {pipeline} exceeds model.num_layers = {self.num_layers}")
        if tensor > 1:
            check(self.num_heads % tensor == 0 and self.num_kv_heads % tensor == 0, "parallel.tensor",
                  f"= {tensor} must divide model.num_heads ({self.num_heads}) and model.num_kv_heads "
                  f"({self.num_kv_heads})")
            check(self.intermediate_size % tensor == 0, "parallel.tensor",
                  f"= {tensor} must divide model.intermediate_size ({self.intermediate_size})")

    def validate(self, p: str) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "max_position_embeddings"):
            check(getattr(self, name) >= 1, f"{p}.{name}", f"must be >= 1, got {getattr(self, name)}")
        check(self.hidden_size % self.num_heads == 0, f"{p}.hidden_size",
               f"= {self.hidden_size} is not divisible by {p}.num_heads = {self.num_heads}")
        check((self.hidden_size // self.num_heads) % 2 == 0, f"{p}.num_heads",
               f"head dim {self.hidden_size // self.num_heads} must be even for RoPE")
        check(self.num_heads % self.num_kv_heads == 0, f"{p}.num_kv_heads",
               f"= {self.num_kv_heads} must divide {p}.num_heads = {self.num_heads}")
        for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
            v = getattr(self, name)
            check(0 <= v < self.vocab_size, f"{p}.{name}",
                   f"= {v} is outside the vocabulary (vocab_size = {self.vocab_size})")
