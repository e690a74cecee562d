"""The Transformer baseline's config section (``model.arch: transformer``)."""
from __future__ import annotations

from dataclasses import dataclass

from calm_pretrain.models.backbone_config import BackboneConfig


@dataclass
class TransformerConfig(BackboneConfig):
    """The discrete next-token baseline on the same backbone, with an untied LM head."""

    arch: str = "transformer"
