"""A Llama-style decoder: RoPE, SwiGLU, RMSNorm, grouped-query attention, torch SDPA, KV cache.

Parameter names follow HF ``LlamaModel`` (the published CALM layout). Nothing here knows about
parallelism: the tensor-parallel plan swaps the projections for megatron-core layers, and attention
infers its local head count from the projection widths, so a split layer just works.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from calm_pretrain.models.backbone_config import BackboneConfig
from calm_pretrain.models.layers import RMSNorm, SwiGLU


class KVCache:
    """Per-layer key/value tensors [B, kv_heads, T, head_dim], grown by concatenation."""

    def __init__(self, num_layers: int):
        self.keys: list[Optional[torch.Tensor]] = [None] * num_layers
        self.values: list[Optional[torch.Tensor]] = [None] * num_layers
        self.length = 0  # positions already in the cache

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (e.g. to continue several roll-outs from one prefix)."""
        self.keys = [None if k is None else k.index_select(0, index) for k in self.keys]
        self.values = [None if v is None else v.index_select(0, index) for v in self.values]


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)  # HF "rotate_half" convention: d pairs with d + hd/2
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, layer_idx: int = 0, cache: Optional[KVCache] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer_idx, k, v)
        gqa = q.shape[1] != k.shape[1]
        if attn_mask is not None:  # caller-defined layout (parallel roll-outs in BrierLM)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        elif past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif t == 1:  # one new position attends to everything cached
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:  # several new positions after a prefix: causal with an offset
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(diagonal=past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, layer_idx: int = 0, cache: Optional[KVCache] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer_idx, cache, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """HF ``LlamaModel`` equivalent: token embedding, decoder layers, final RMSNorm."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.rotary = RotaryEmbedding(cfg.hidden_size // cfg.num_heads, cfg.rope_theta)

    def forward(self, inputs_embeds: torch.Tensor, cache: Optional[KVCache] = None,
                positions: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """inputs_embeds [B, T, H] → final hidden states [B, T, H] (after the final norm).

        By default the T new positions continue the cache causally. ``positions`` [T] (RoPE
        positions) and ``attn_mask`` (bool [T, cached + T], True = attend) override that layout,
        so many continuations of one cached prefix can run side by side (BrierLM roll-outs).
        """
        t = inputs_embeds.shape[1]
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + t, device=inputs_embeds.device)
        cos, sin = self.rotary(positions, inputs_embeds.dtype)
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, i, cache, attn_mask)
        if cache is not None:
            cache.length += t
        return self.norm(x)

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers))
