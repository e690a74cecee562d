"""Building blocks shared by the autoencoder, the backbone and the heads."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

class RMSNorm(nn.Module):
    """w · x / sqrt(mean(x²) + eps), computed in fp32 as in Llama."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(dtype)


class SwiGLU(nn.Module):
    """Llama MLP: down(silu(gate(x)) ⊙ up(x)), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def init_weights(module: nn.Module, std: float, param_context=None) -> None:
    """Normal(0, std) for linears and embeddings, zero biases, unit norms (HF Llama's scheme).

    ``param_context(params)``, when given, wraps the initialisation of each module's own parameters
    (a sharded build gathers them only for that moment); the order of random draws is the same.
    """
    for m in module.modules():
        with _context(param_context, m):
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif isinstance(m, (RMSNorm, nn.LayerNorm)):
                if getattr(m, "weight", None) is not None:
                    nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)


def _context(param_context, module: nn.Module):
    params = list(module.parameters(recurse=False))
    return param_context(params) if param_context is not None and params else contextlib.nullcontext()
