"""Plans applied to a finished model: the model classes know nothing of these.

* activation checkpointing: each block its architecture's spec names (``checkpoint_blocks``: a decoder
  layer, an autoencoder layer) recomputes its activations in backward;
* compilation (train.compile): each block the spec names (``compile_blocks``, else its
  ``checkpoint_blocks``) is compiled in place (``nn.Module.compile``), so parameter names, state dicts
  and checkpoints are those of the eager model;
* ZeRO-3 leaves: modules whose forward reads a child's parameters directly (not through the child's
  forward; the spec's ``zero3_leaves``, e.g. CALM's ResidualMLPBlock, which applies the halves of its
  first linear's weight itself) must have all their parameters gathered at once under ZeRO-3.
"""
from __future__ import annotations

import functools

import torch.utils.checkpoint
from torch import nn

from calm_pretrain.models.registry import spec_of


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Wrap every block's forward in non-reentrant checkpointing while training; returns how many."""
    count, blocks = 0, spec_of(model.config).checkpoint_blocks
    for module in model.modules():
        if isinstance(module, blocks) and not getattr(module, "_checkpointed", False):
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

    present = [cls for cls in spec_of(model.config).zero3_leaves if any(isinstance(m, cls) for m in model.modules())]
    if present:
        set_z3_leaf_modules(model, present)


def apply_compile(model: nn.Module, mode: str = "default") -> int:
    """torch.compile every block the spec names, in place; returns how many. Each block is one graph of
    fixed shapes (a decoder layer, the head), so a change of batch or sequence length recompiles it once."""
    spec = spec_of(model.config)
    blocks = spec.compile_blocks if spec.compile_blocks is not None else spec.checkpoint_blocks
    count = 0
    for module in model.modules():
        if isinstance(module, blocks):
            module.compile(mode=mode, dynamic=False)
            count += 1
    return count
