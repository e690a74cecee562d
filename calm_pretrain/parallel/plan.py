"""Plans applied to a finished model: the model classes know nothing of these.

* activation checkpointing: each transformer/autoencoder block recomputes its activations in backward;
* ZeRO-3 leaves: modules whose forward reads a child's parameters directly (not through the child's
  forward) must have all their parameters gathered at once under ZeRO-3.
"""
from __future__ import annotations

import functools

import torch.utils.checkpoint
from torch import nn

from calm_pretrain.models.autoencoder import AELayer
from calm_pretrain.models.backbone import DecoderLayer
from calm_pretrain.models.heads import ResidualMLPBlock

CHECKPOINTED_BLOCKS = (DecoderLayer, AELayer)
# ResidualMLPBlock applies the halves of its first linear's weight itself (condition once per position).
ZERO3_LEAF_MODULES = (ResidualMLPBlock,)


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Wrap every block's forward in non-reentrant checkpointing while training; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, CHECKPOINTED_BLOCKS) and not getattr(module, "_checkpointed", False):
            inner = module.forward

            @functools.wraps(inner)
            def forward(*args, _inner=inner, _module=module, **kwargs):
                if _module.training and torch.is_grad_enabled():
                    return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False, **kwargs)
                return _inner(*args, **kwargs)

            module.forward = forward
            module._checkpointed = True
            count += 1
    return count


def mark_zero3_leaves(model: nn.Module) -> None:
    from deepspeed.utils import set_z3_leaf_modules

    present = [cls for cls in ZERO3_LEAF_MODULES if any(isinstance(m, cls) for m in model.modules())]
    if present:
        set_z3_leaf_modules(model, present)
