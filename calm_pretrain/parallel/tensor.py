"""Tensor parallelism: a plan that swaps the backbone's projections for megatron-core layers.

Applied to a finished model (``apply_tensor_parallel``), after ``init_model_parallel``; the model
classes know nothing of it. In every decoder layer of every ``Backbone``:

  self_attn.q_proj / k_proj / v_proj  → ColumnParallelLinear (query heads and KV heads split across ranks)
  self_attn.o_proj                    → RowParallelLinear (its input is the rank's heads; output all-reduced)
  mlp.gate_proj / up_proj             → ColumnParallelLinear
  mlp.down_proj                       → RowParallelLinear
and ``embed_tokens`` → VocabParallelEmbedding (vocabulary rows split; padded with zero rows to a
multiple of the TP size when needed — the padding is never looked up and never exported).

Attention needs no change: it reads its local head count from the projection widths (``view(b, t, -1,
head_dim)``), and with heads split contiguously local query head j still maps onto local KV head
j // (num_heads / num_kv_heads), so grouped-query attention stays correct per rank.

Weights: the plan copies each rank's slice of the full weights already in the model, so a TP run
starts from exactly the TP=1 weights; parameter names are unchanged (``...q_proj.weight``), and the
layers keep no megatron ``_extra_state`` entries, so a state dict has the TP=1 keys (with local
shapes). ``gather_tensor_parallel_state_dict`` rebuilds the full state dict (checkpoint consolidation,
export); ``shard_full_state_dict`` is its inverse (loading a consolidated checkpoint into a TP model).

Replicated on every TP rank: norms, CALM's input compression (``embed_proj``), the energy head
(``mlp_generator``), the Transformer's ``lm_head``. Their gradients are equal on the ranks of a TP
group as long as the inputs and the noise are: every TP rank of a group must read the same batch (the
loader is sharded by data-parallel rank, not global rank) and draw the head's noise from the same
seed (``groups.tensor_parallel_seed``: ``train.seed * 1_000_003 + dp_rank``). DeepSpeed counts the
replicated parameters once in the gradient norm (on model-parallel rank 0) and the split ones on
every rank (they carry megatron's ``tensor_model_parallel`` attribute), then sums over the group.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

from calm_pretrain.models.backbone import Backbone
from calm_pretrain.parallel import mcore_shim

_COLUMN = ("q_proj", "k_proj", "v_proj")
_ROW = ("o_proj",)
_MLP_COLUMN = ("gate_proj", "up_proj")
_MLP_ROW = ("down_proj",)
# Where in a decoder layer each split projection lives, and along which dimension it is split.
_SPLIT_DIM = {**{f"self_attn.{n}": 0 for n in _COLUMN}, **{f"self_attn.{n}": 1 for n in _ROW},
              **{f"mlp.{n}": 0 for n in _MLP_COLUMN}, **{f"mlp.{n}": 1 for n in _MLP_ROW}}


class _PlainLinear:
    """What the swapped megatron linears share: they return a tensor (megatron returns (output, bias)),
    and they keep the plain module's state-dict behaviour (megatron adds an ``_extra_state`` entry,
    None, and a load hook that inserts it), so state dicts have the TP=1 keys."""

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._load_state_dict_pre_hooks.clear()

    def forward(self, x):  # noqa: D102
        return super().forward(x)[0]


class TPColumnLinear(_PlainLinear, ColumnParallelLinear):
    """ColumnParallelLinear; output not gathered."""

    partition_dim = 0


class TPRowLinear(_PlainLinear, RowParallelLinear):
    """RowParallelLinear (input already split, output all-reduced)."""

    partition_dim = 1


class TPVocabEmbedding(VocabParallelEmbedding):
    """VocabParallelEmbedding that remembers the unpadded vocabulary size (``unpadded_num_embeddings``)."""

    partition_dim = 0


_TP_CLASSES = (TPColumnLinear, TPRowLinear, TPVocabEmbedding)


def is_tensor_parallel_module(module: nn.Module) -> bool:
    return isinstance(module, _TP_CLASSES)


def _mcore_config(tp_size: int, dtype: torch.dtype):
    from megatron.core import ModelParallelConfig

    # Weights are allocated on the CPU and filled by the plan (no megatron init, no RNG tracker).
    return ModelParallelConfig(tensor_model_parallel_size=tp_size, params_dtype=dtype, use_cpu_initialization=True,
                               perform_initialization=False, sequence_parallel=False,
                               gradient_accumulation_fusion=False)


def _tp_group(tp_group=None):
    if tp_group is not None:
        return tp_group
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("apply_tensor_parallel: call calm_pretrain.parallel.groups.init_model_parallel first")
    return ps.get_tensor_model_parallel_group()


def _finish(new: nn.Module, old: nn.Module, dim: int, rank: int, size: int, padded: Optional[int] = None):
    """Copy this rank's slice of `old.weight` along `dim` into `new.weight`, mark it tensor-parallel."""
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    full = old.weight.detach()
    if padded is not None and padded > full.shape[dim]:
        pad_shape = list(full.shape)
        pad_shape[dim] = padded - full.shape[dim]
        full = torch.cat([full, full.new_zeros(pad_shape)], dim=dim)
    piece = full.chunk(size, dim=dim)[rank]
    with torch.no_grad():
        new.weight.copy_(piece)
    new.to(full.device)
    new.weight.requires_grad_(old.weight.requires_grad)
    set_tensor_model_parallel_attributes(new.weight, True, dim, 1)
    new.weight.unsplit_shape = tuple(old.weight.shape)  # what a resume at another TP size must match
    return new


def _swap_linear(parent: nn.Module, name: str, kind: str, group, rank: int, size: int) -> None:
    old = getattr(parent, name)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"{name}: expected nn.Linear, found {type(old).__name__}")
    if old.bias is not None:
        raise ValueError(f"{name}: the backbone's projections have no bias; this one does")
    config = _mcore_config(size, old.weight.dtype)
    out_f, in_f = old.weight.shape

    def init(_):  # never called: perform_initialization=False
        raise AssertionError("megatron init must not run; weights come from the model")

    if kind == "column":
        if out_f % size:
            raise ValueError(f"{name}: output width {out_f} is not divisible by tensor parallel size {size}")
        new = TPColumnLinear(in_f, out_f, config=config, init_method=init, bias=False, gather_output=False,
                             skip_bias_add=False, tp_group=group)
        _finish(new, old, 0, rank, size)
    else:
        if in_f % size:
            raise ValueError(f"{name}: input width {in_f} is not divisible by tensor parallel size {size}")
        new = TPRowLinear(in_f, out_f, config=config, init_method=init, bias=False, input_is_parallel=True,
                          skip_bias_add=False, tp_group=group)
        _finish(new, old, 1, rank, size)
    setattr(parent, name, new)


def _swap_embedding(backbone: Backbone, group, rank: int, size: int) -> None:
    old = backbone.embed_tokens
    if not isinstance(old, nn.Embedding):
        raise TypeError(f"embed_tokens: expected nn.Embedding, found {type(old).__name__}")
    vocab, dim = old.weight.shape
    padded = -(-vocab // size) * size
    new = TPVocabEmbedding(padded, dim, init_method=None, config=_mcore_config(size, old.weight.dtype), tp_group=group)
    _finish(new, old, 0, rank, size, padded=padded)
    new.unpadded_num_embeddings = vocab
    backbone.embed_tokens = new


def apply_tensor_parallel(model: nn.Module, tp_group=None) -> int:
    """Split every Backbone of `model` across the tensor-parallel group (megatron's, by default).

    Returns how many layers were swapped (0 at TP size 1: the model is left as it is). Idempotent.
    """
    mcore_shim.apply()
    group = _tp_group(tp_group)
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if size == 1 or getattr(model, "_tensor_parallel_size", 1) > 1:
        return 0
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ValueError("tensor parallelism needs the full weights in the model (train.zero_stage 0, 1 or 2); "
                         "this model was built partitioned by ZeRO-3")
    count = 0
    for backbone in [m for m in model.modules() if isinstance(m, Backbone)]:
        cfg = backbone.config
        if cfg.num_heads % size or cfg.num_kv_heads % size:
            raise ValueError(f"tensor parallel size {size} must divide num_heads ({cfg.num_heads}) and "
                             f"num_kv_heads ({cfg.num_kv_heads})")
        for layer in backbone.layers:
            for name in _COLUMN:
                _swap_linear(layer.self_attn, name, "column", group, rank, size)
            for name in _ROW:
                _swap_linear(layer.self_attn, name, "row", group, rank, size)
            for name in _MLP_COLUMN:
                _swap_linear(layer.mlp, name, "column", group, rank, size)
            for name in _MLP_ROW:
                _swap_linear(layer.mlp, name, "row", group, rank, size)
            count += len(_COLUMN) + len(_ROW) + len(_MLP_COLUMN) + len(_MLP_ROW)
        _swap_embedding(backbone, group, rank, size)
        count += 1
    model._tensor_parallel_size = size
    return count


def universal_checkpoint_info(model: nn.Module) -> Optional[dict]:
    """How DeepSpeed's universal converter (``ds_to_universal``) merges this model's tensor-parallel
    slices, and how a run at another TP size cuts them again; saved with every checkpoint of a model
    with a Backbone, split or not (None without one). Column-parallel and vocabulary slices join along
    dim 0 (the vocabulary's zero padding is dropped, and re-added for the new TP size on load),
    row-parallel ones along dim 1; every other parameter is replicated and its slices must agree.
    Patterns match a flat name (``transformer.layers.0.self_attn.o_proj.weight``) and a pipeline one
    (``1.layer.self_attn.o_proj.weight``) alike."""
    vocab = {getattr(b.embed_tokens, "unpadded_num_embeddings", b.embed_tokens.num_embeddings)
             for b in model.modules() if isinstance(b, Backbone)}
    if not vocab:
        return None
    if len(vocab) != 1:
        raise ValueError(f"expected one vocabulary size across the model's backbones, found {sorted(vocab)}")
    # A decoder layer is ``...layers.<i>.`` in the model and ``<stage layer>.layer.`` in a pipeline; the
    # energy head's own ``down_proj`` (``mlp_generator.mlp_blocks.0.down_proj``) is not one of them.
    layer = r"^(.*\.)?(layers\.\d+|\d+\.layer)\."

    def split_along(dim):
        return rf"{layer}({'|'.join(re.escape(n) for n, d in _SPLIT_DIM.items() if d == dim)})\.weight$"

    column, row = split_along(0), split_along(1)
    embedding = r"^(.*\.)?embed_tokens\.weight$"
    return {"tp_replicated_parameter_patterns": [rf"^(?!{column}|{row}|{embedding})"],
            "parameter_with_row_parallelism_patterns": [row],
            "vocabulary_parameter_patterns": [embedding],
            "original_vocab_size": vocab.pop()}


def _split_modules(model: nn.Module):
    """(prefix, module) of every tensor-parallel layer of the model."""
    for prefix, module in model.named_modules():
        if is_tensor_parallel_module(module):
            yield (prefix + "." if prefix else ""), module


@torch.no_grad()
def gather_tensor_parallel_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict under the model's own parameter names, on every TP rank.

    Collective over each tensor-parallel group (every rank of the group must call it). Vocabulary
    padding is removed. Tensors are detached copies on the parameters' device.
    """
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for prefix, module in _split_modules(model):
        group = module.tp_group
        local = module.weight.detach().contiguous()
        pieces = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, local, group=group)
        full = torch.cat(pieces, dim=module.partition_dim)
        vocab = getattr(module, "unpadded_num_embeddings", None)
        if vocab is not None:
            full = full[:vocab].clone()
        state[prefix + "weight"] = full
    return state


@torch.no_grad()
def shard_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full state dict (TP=1 shapes) → this rank's state dict for the tensor-parallel `model`
    (``model.load_state_dict(shard_full_state_dict(model, full))``). No communication."""
    local = dict(full)
    for prefix, module in _split_modules(model):
        key = prefix + "weight"
        tensor = full[key]
        size, rank = dist.get_world_size(module.tp_group), dist.get_rank(module.tp_group)
        dim = module.partition_dim
        vocab = getattr(module, "unpadded_num_embeddings", None)
        if vocab is not None:
            padded = module.num_embeddings
            if padded > tensor.shape[0]:
                tensor = torch.cat([tensor, tensor.new_zeros(padded - tensor.shape[0], *tensor.shape[1:])])
        local[key] = tensor.chunk(size, dim=dim)[rank].clone()
    return local




def split_dim_of(name: str, prefix: str = "transformer.") -> Optional[int]:
    """The dimension along which the plan splits the parameter `name` (a key of a CALM or Transformer
    state dict, the backbone under `prefix`), or None for a replicated one. Name-based, for offline use."""
    if not name.startswith(prefix) or not name.endswith(".weight"):
        return None
    rest = name[len(prefix):-len(".weight")]
    if rest == "embed_tokens":
        return 0
    parts = rest.split(".")
    if len(parts) == 4 and parts[0] == "layers" and parts[1].isdigit():
        return _SPLIT_DIM.get(".".join(parts[2:]))
    return None


def merge_tensor_parallel_shards(shards: list[dict], vocab_size: int, prefix: str = "transformer.") -> dict:
    """Offline consolidation: the state dicts of TP ranks 0..n-1 (e.g. the ``module`` of DeepSpeed's
    ``mp_rank_XX_model_states.pt`` files) → the full state dict. Replicated tensors are taken from rank 0
    after checking that every rank holds the same keys."""
    keys = list(shards[0])
    if any(list(s) != keys for s in shards[1:]):
        raise ValueError("tensor-parallel shards hold different parameter names")
    full = {}
    for k in keys:
        dim = split_dim_of(k, prefix)
        if dim is None:
            full[k] = shards[0][k]
            continue
        t = torch.cat([s[k] for s in shards], dim=dim)
        full[k] = t[:vocab_size] if k == prefix + "embed_tokens.weight" else t
    return full


__all__ = ["TPColumnLinear", "TPRowLinear", "TPVocabEmbedding", "apply_tensor_parallel", "gather_tensor_parallel_state_dict", "shard_full_state_dict",
           "merge_tensor_parallel_shards", "split_dim_of", "is_tensor_parallel_module"]
