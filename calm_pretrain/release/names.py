"""Parameter names ours ↔ release (through the architecture's adapter), and the checks of a release's
tensors (names, shapes)."""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from calm_pretrain.release.adapters import Published, adapter_of
from calm_pretrain.models.release_layout import ReleaseAdapter, ReleaseError, few


def check_tensors(got: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], where: str,
                  adapter: Optional[ReleaseAdapter] = None) -> None:
    """Same names and shapes, or one error listing a few missing / unexpected / mismatched names
    (release names, as they appear in the file, when the `adapter` of their layout is given)."""
    name = adapter.to_release_name if adapter is not None else (lambda k: k)
    missing = [name(k) for k in expected if k not in got]
    unexpected = [name(k) for k in got if k not in expected]
    mismatched = [f"{name(k)} {tuple(got[k].shape)} (expected {tuple(expected[k])})"
                  for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {few(sorted(missing))}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {few(sorted(unexpected))}")
    if mismatched:
        problems.append(f"shape mismatch in {len(mismatched)} tensor(s): {few(mismatched)}")
    if problems:
        raise ReleaseError(f"{where}: " + "; ".join(problems))


def split_release_state(kind: Published, tensors: dict, where: str, tie_word_embeddings: bool = False):
    """Release tensors → (our state dict, embedded AE state dict or None). Resolves ties and aliases."""
    return kind.adapter.from_release(dict(tensors), where, kind.name, tie_word_embeddings)


def release_state(cfg, state: Mapping[str, torch.Tensor], ae_state: Optional[Mapping[str, torch.Tensor]] = None):
    """Our state dict → {release name: tensor}, with every alias the reference layout has."""
    return adapter_of(cfg).to_release(cfg, state, ae_state)


def expected_shapes(cfg) -> dict[str, torch.Size]:
    """{our name: shape} of the model `cfg` describes (built on the meta device: nothing allocated)."""
    from calm_pretrain.models import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}
