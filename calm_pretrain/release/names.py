"""Parameter names ours ↔ release, and the checks of a release's tensors (names, shapes, ties, aliases)."""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from calm_pretrain.release.layout import (AE_PREFIX, AE_TIED, ARCH_AE, ARCH_CALM, ARCH_LLAMA, HEAD_ALIAS_PREFIX,
                                          HEAD_PREFIX, ReleaseError, architecture_of)

_PREFIX_MAPS = {ARCH_LLAMA: [("transformer.", "model."), ("lm_head.", "lm_head.")]}


def to_release_name(arch: str, name: str) -> str:
    for ours, theirs in _PREFIX_MAPS.get(arch, []):
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


def from_release_name(arch: str, name: str) -> Optional[str]:
    """Our name for a release name, or None when it has no counterpart."""
    maps = _PREFIX_MAPS.get(arch)
    if maps is None:
        return name
    for ours, theirs in maps:
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    return None


def _few(names, n: int = 5) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def check_tensors(got: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], where: str,
                  arch: str = ARCH_AE) -> None:
    """Same names and shapes, or one error listing a few missing / unexpected / mismatched names
    (release names, as they appear in the file)."""
    missing = [to_release_name(arch, k) for k in expected if k not in got]
    unexpected = [to_release_name(arch, k) for k in got if k not in expected]
    mismatched = [f"{to_release_name(arch, k)} {tuple(got[k].shape)} (expected {tuple(expected[k])})"
                  for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_few(sorted(missing))}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_few(sorted(unexpected))}")
    if mismatched:
        problems.append(f"shape mismatch in {len(mismatched)} tensor(s): {_few(mismatched)}")
    if problems:
        raise ReleaseError(f"{where}: " + "; ".join(problems))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_meta or b.is_meta:  # header-only inspection: values unknown
        return a.shape == b.shape
    return a.shape == b.shape and torch.equal(a, b)


def _fill_ae_tie(state: dict, where: str) -> None:
    """Our AE holds one Parameter under both tied names, so either name alone suffices to load it (our
    exports always write both, which the reference loader needs: docs/release.md, 'The tied AE embedding'); when
    both are given they must agree."""
    a, b = AE_TIED
    if a in state and b in state:
        if not _same(state[a], state[b]):
            raise ReleaseError(f"{where}: {a} and {b} differ, but they are one tied weight")
    elif a in state:
        state[b] = state[a]
    elif b in state:
        state[a] = state[b]


def split_release_state(arch: str, tensors: dict, where: str, tie_word_embeddings: bool = False):
    """Release tensors → (our state dict, embedded AE state dict or None). Resolves ties and aliases."""
    tensors = dict(tensors)
    if arch in (ARCH_AE, "native"):
        _fill_ae_tie(tensors, where)
        return tensors, None
    if arch == ARCH_LLAMA:
        # Older HF files carry RoPE's inv_freq (recomputed from the config, never a weight).
        tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
        if tie_word_embeddings and "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        ours, unknown = {}, []
        for k, v in tensors.items():
            name = from_release_name(arch, k)
            if name is None:
                unknown.append(k)
            else:
                ours[name] = v
        if unknown:
            raise ReleaseError(f"{where}: unexpected {len(unknown)} tensor(s): {_few(sorted(unknown))}")
        return ours, None
    # CALM: the AE copy and the head alias are optional (docs/release.md, 'How a CALM finds its AE'); if both
    # head names are present they are one module in the reference and must hold the same values.
    ae = {k[len(AE_PREFIX):]: v for k, v in tensors.items() if k.startswith(AE_PREFIX)} or None
    ours = {k: v for k, v in tensors.items() if not k.startswith((AE_PREFIX, HEAD_ALIAS_PREFIX))}
    for k, v in tensors.items():
        if k.startswith(HEAD_ALIAS_PREFIX):
            name = HEAD_PREFIX + k[len(HEAD_ALIAS_PREFIX):]
            if name in ours:
                if not _same(ours[name], v):
                    raise ReleaseError(f"{where}: {name} and {k} differ, but they are one module")
            else:
                ours[name] = v
    if ae is not None:
        _fill_ae_tie(ae, where)
    return ours, ae


def release_state(cfg, state: Mapping[str, torch.Tensor], ae_state: Optional[Mapping[str, torch.Tensor]] = None):
    """Our state dict → {release name: tensor}, with every alias the reference layout has."""
    arch = architecture_of(cfg)
    out = {to_release_name(arch, k): v for k, v in state.items()}
    if arch == ARCH_CALM:
        for k, v in state.items():
            if k.startswith(HEAD_PREFIX):  # two names in the reference: docs/release.md, 'CALM parameter names'
                out[HEAD_ALIAS_PREFIX + k[len(HEAD_PREFIX):]] = v
    if ae_state is not None:
        out.update({AE_PREFIX + k: v for k, v in ae_state.items()})
    return out


def expected_shapes(cfg) -> dict[str, torch.Size]:
    """{our name: shape} of the model `cfg` describes (built on the meta device: nothing allocated)."""
    from calm_pretrain.models import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}

