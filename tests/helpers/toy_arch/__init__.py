"""A toy architecture from outside calm_pretrain (``model.arch: toy``): a bigram next-token LM, one
package with its config, module, loss, data, FLOPs, evaluation and spec, registered by naming this
module in CALM_PRETRAIN_ARCHITECTURES (calm_pretrain/models/registry.py). tests/test_toy_architecture.py
drives it through the project's commands; nothing in calm_pretrain knows it exists."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from calm_pretrain.brier import brier_lm, merge_scores, two_sample_brier
from calm_pretrain.models.spec import ModelSpec
from calm_pretrain.models.release_layout import ReleaseAdapter
from calm_pretrain.schema import check

MAX_N = 4  # Brier-1..4


@dataclass
class ToyConfig:
    """The model section: a table of next-token logits given the previous token."""

    arch: str = "toy"
    vocab_size: int = 64
    init_std: float = 0.02
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    tokens_per_position = 1  # one token per position

    def validate(self, p: str) -> None:
        check(self.vocab_size >= 3, f"{p}.vocab_size", f"must be >= 3, got {self.vocab_size}")
        check(self.init_std > 0, f"{p}.init_std", f"must be > 0, got {self.init_std}")

    def validate_parallel(self, tensor: int, pipeline: int) -> None:
        check(tensor == 1 and pipeline == 1, "parallel", f"the toy model has no tensor or pipeline split "
              f"(tensor = {tensor}, pipeline = {pipeline}): use data parallelism")


@dataclass
class ToyOutput:
    loss: torch.Tensor
    logits: torch.Tensor


class BigramLM(nn.Module):
    k = 1

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.config = cfg
        self.table = nn.Embedding(cfg.vocab_size, cfg.vocab_size)
        self.reset_parameters()

    def reset_parameters(self, param_context=None) -> None:
        nn.init.normal_(self.table.weight, std=self.config.init_std)

    def forward(self, ids: torch.Tensor) -> ToyOutput:
        logits = self.table(ids[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        return ToyOutput(loss=loss, logits=logits)


def loss(forward, batch: dict):
    return forward(batch["ids"]).loss, {}


def data(cfg: ToyConfig, seq_chunks: int) -> dict:
    return {"sample_tokens": seq_chunks, "vocab_size": cfg.vocab_size}


def example_batch(cfg: ToyConfig, batch_size: int, seq_chunks: int, generator) -> dict:
    return {"ids": torch.randint(3, cfg.vocab_size, (batch_size, seq_chunks), generator=generator)}


def training_flops(cfg: ToyConfig, context: int, ae=None) -> dict:
    return {"table": 6.0 * cfg.vocab_size}  # forward + backward of a V-wide output per token


def _rollout(model: BigramLM, last: torch.Tensor, generator) -> torch.Tensor:
    """MAX_N tokens sampled after each of `last` [B, S]: [B, S, MAX_N]."""
    out = []
    for _ in range(MAX_N):
        probs = F.softmax(model.table(last).float(), dim=-1)
        last = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).reshape(last.shape)
        out.append(last)
    return torch.stack(out, -1)


@torch.no_grad()
def evaluate(model: BigramLM, blocks, ae=None, seed: int = 0, draws: int = 1) -> dict:
    """Brier-1..4 and BrierLM with the two-sample estimator (calm_pretrain.brier) at every start position
    that has MAX_N gold tokens after it."""
    gen = torch.Generator().manual_seed(seed)
    total = None
    for block in blocks:
        ids = torch.as_tensor(block).long()
        ids = ids[None] if ids.dim() == 1 else ids
        starts = ids.shape[1] - MAX_N
        if starts < 1:
            continue
        gold = torch.stack([ids[:, s + 1: s + 1 + starts] for s in range(MAX_N)], -1)  # [B, S, MAX_N]
        for _ in range(draws):
            est = two_sample_brier(_rollout(model, ids[:, :starts], gen), _rollout(model, ids[:, :starts], gen), gold)
            total = merge_scores(total, {"sum": est.sum((0, 1)), "sumsq": est.square().sum((0, 1)),
                                         "count": torch.full((MAX_N,), est.shape[0] * starts, dtype=torch.int64)})
    if total is None:
        raise ValueError(f"no evaluation block of more than {MAX_N} tokens")
    return brier_lm(total)


class ToyRelease(ReleaseAdapter):
    """Published as `ToyBigramLM`: config.json holds the config's own fields, the weights our names."""

    published_names = ("ToyBigramLM",)

    def known_config_keys(self, name: str) -> set[str]:
        return {f.name for f in dataclasses.fields(ToyConfig)}

    def release_config(self, cfg: ToyConfig) -> dict:
        return dataclasses.asdict(cfg)

    def config_dict(self, values: dict, name: str, base: dict, cfg_path) -> dict:
        return {k: values[k] for k in self.known_config_keys(name) if k in values}


SPEC = ModelSpec(
    arch="toy", label="Toy bigram", config=ToyConfig, model=BigramLM, components=(("table.", "bigram table"),),
    loss=loss, data=data, example_batch=example_batch, evaluate=evaluate, training_flops=training_flops,
    release=ToyRelease(),
)
