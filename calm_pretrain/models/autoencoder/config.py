"""The autoencoder's config section (``model.arch: autoencoder``)."""
from __future__ import annotations

from dataclasses import dataclass

from calm_pretrain.schema import check


@dataclass
class AutoencoderConfig:
    """The token-chunk autoencoder (docs/method.md, 'Autoencoder'). Defaults are the published K=4 / d=128 AE."""

    arch: str = "autoencoder"
    k: int = 4  # tokens per chunk ("patch_size")
    latent_dim: int = 128
    vocab_size: int = 128257
    hidden_size: int = 512
    intermediate_size: int = 1280
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    norm_eps: float = 1e-6
    token_mask_prob: float = 0.15  # masked ids are replaced by `mask_token_id` (id 0, as published)
    mask_token_id: int = 0
    latent_dropout: float = 0.15
    kl_clamp: float = 0.5  # per-dimension KL floor ("free bits")
    kl_weight: float = 1e-3
    init_std: float = 0.02
    pad_token_id: int = 128256
    eos_token_id: int = 128001
    bos_token_id: int = 128000

    @property
    def tokens_per_position(self) -> int:
        return self.k

    def validate_parallel(self, tensor: int, pipeline: int) -> None:
        """The autoencoder trains data-parallel only (it is small: 75M parameters at the published size)."""
        for key, size in (("parallel.tensor", tensor), ("parallel.pipeline", pipeline)):
            check(size == 1, key, f"= {size}: the autoencoder trains data-parallel only (set {key}=1)")

    def validate(self, p: str) -> None:
        check(self.k >= 1, f"{p}.k", f"must be >= 1, got {self.k}")
        for name in ("latent_dim", "vocab_size", "hidden_size", "intermediate_size"):
            check(getattr(self, name) >= 1, f"{p}.{name}", "must be >= 1")
        for name in ("num_encoder_layers", "num_decoder_layers"):
            n = getattr(self, name)
            check(n >= 2 and n % 2 == 0, f"{p}.{name}",
                   f"must be an even number >= 2 (split into two stages), got {n}")
        for name in ("token_mask_prob", "latent_dropout"):
            v = getattr(self, name)
            check(0.0 <= v < 1.0, f"{p}.{name}", f"must be in [0, 1), got {v}")
        for name in ("pad_token_id", "eos_token_id", "bos_token_id", "mask_token_id"):
            v = getattr(self, name)
            check(0 <= v < self.vocab_size, f"{p}.{name}",
                   f"= {v} is outside the vocabulary (vocab_size = {self.vocab_size})")
