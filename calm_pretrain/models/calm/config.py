"""CALM's config section (``model.arch: calm``): the backbone, K, the latent size and the generative head."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from calm_pretrain.models.backbone_config import BackboneConfig
from calm_pretrain.models.calm.heads import HEADS
from calm_pretrain.schema import check


@dataclass
class HeadConfig:
    """The generative head of CALM (docs/method.md, 'Energy head'); `type` selects a head from the registry."""

    type: str = "energy"  # energy | flow | diffusion | gmm | mse (models/calm/heads.py HEADS)
    num_blocks: int = 4  # residual MLP blocks ("num_mlp_layers"); the depth of every head's network
    noise_size: int = 64  # energy head only
    # energy: N head samples per position for the energy loss; flow, diffusion, gmm: posterior
    # samples per position used as training targets (the reference trains on 8); mse: unused
    num_samples: int = 8
    # energy head only
    num_target_samples: int = 100  # M: posterior samples per position
    alpha: float = 1.0  # exponent of the distance in the energy score ("beta" in the reference)
    loss_chunk_positions: int = 1024  # positions per chunk in the fused energy loss (bounds memory)
    # flow head: ODE solver steps (network evaluations = steps, ×2 for midpoint; reference: 20)
    flow_steps: int = 10
    flow_solver: str = "midpoint"  # euler | midpoint
    # diffusion head: discrete training steps T of the cosine schedule, DDIM sampling steps S <= T
    diffusion_train_steps: int = 1000
    diffusion_steps: int = 100
    # gmm head: mixture components
    num_components: int = 8
    # Width-aware init of the head (docs/method.md, 'Head initialisation at small width'): below this width the head's
    # weights are drawn with std model.init_std · sqrt(init_reference_width / H), so a narrow head
    # starts as sensitive to its condition as CALM-M's (H = 1024) does; at or above it, and with 0,
    # the head gets model.init_std exactly as published.
    init_reference_width: int = 1024

    def validate(self, p: str) -> None:
        check(self.type in HEADS, f"{p}.type", f"unknown head {self.type!r}; known: {sorted(HEADS)}")
        check(self.num_blocks >= 1, f"{p}.num_blocks", "must be >= 1")
        check(self.noise_size >= 1, f"{p}.noise_size", "must be >= 1")
        if self.type == "energy":
            check(self.num_samples >= 2, f"{p}.num_samples",
                   f"must be >= 2 (the energy score's model-model term needs two samples), got {self.num_samples}")
            check(0.0 < self.alpha < 2.0, f"{p}.alpha",
                   f"must be in (0, 2) for a strictly proper energy score, got {self.alpha}")
        else:
            check(self.num_samples >= 1, f"{p}.num_samples", f"must be >= 1, got {self.num_samples}")
        check(self.num_target_samples >= 1, f"{p}.num_target_samples", "must be >= 1")
        check(self.init_reference_width >= 0, f"{p}.init_reference_width", "must be >= 0 (0: no width scaling)")
        check(self.loss_chunk_positions >= 1, f"{p}.loss_chunk_positions", "must be >= 1")
        check(self.flow_steps >= 1, f"{p}.flow_steps", f"must be >= 1, got {self.flow_steps}")
        check(self.flow_solver in ("euler", "midpoint"), f"{p}.flow_solver",
               f"must be 'euler' or 'midpoint', got {self.flow_solver!r}")
        check(self.diffusion_train_steps >= 2, f"{p}.diffusion_train_steps",
               f"must be >= 2, got {self.diffusion_train_steps}")
        check(1 <= self.diffusion_steps <= self.diffusion_train_steps, f"{p}.diffusion_steps",
               f"must be in [1, diffusion_train_steps = {self.diffusion_train_steps}], got {self.diffusion_steps}")
        check(self.num_components >= 1, f"{p}.num_components", f"must be >= 1, got {self.num_components}")


@dataclass
class CALMConfig(BackboneConfig):
    """CALM LM: input compression of K tokens + backbone + generative head (docs/method.md, 'CALM language model')."""

    arch: str = "calm"
    k: int = 4
    latent_dim: int = 128
    head: HeadConfig = field(default_factory=HeadConfig)
    ae_path: Optional[str] = None  # frozen autoencoder (release directory) for encoding/eval/generation

    @property
    def tokens_per_position(self) -> int:
        return self.k

    def validate(self, p: str) -> None:
        super().validate(p)
        check(self.k >= 1, f"{p}.k", f"must be >= 1, got {self.k}")
        check(self.latent_dim >= 1, f"{p}.latent_dim", "must be >= 1")
        self.head.validate(f"{p}.head")
