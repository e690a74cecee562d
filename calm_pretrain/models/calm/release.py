"""CALM's release adapter: the published ``EnergyTransformer`` (docs/release.md, 'CALM config.json',
'CALM parameter names', 'How a CALM finds its AE'), and ``CALM`` for our non-energy heads (the same
layout with our head names, which needs our sidecar for the head type).

Our module already uses the published names; the reference registers the head a second time as
``generative_head.*`` and may embed the frozen autoencoder under ``ae_model.*`` (in its own layout)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from calm_pretrain.models import backbone_release as backbone
from calm_pretrain.models.autoencoder.release import RELEASE as AE_RELEASE
from calm_pretrain.models.release_layout import SIDECAR_NAME, ReleaseAdapter, ReleaseError, mapped, require_keys, same_tensor

ARCH_CALM = "EnergyTransformer"
ARCH_CALM_OTHER_HEAD = "CALM"  # our non-energy heads: same layout, head names of ours, needs the sidecar
HEAD_PREFIX, HEAD_ALIAS_PREFIX, AE_PREFIX = "mlp_generator.", "generative_head.", "ae_model."

CALM_FIELDS = [("patch_size", "k"), ("latent_size", "latent_dim"), ("ae_path", "ae_path")]
HEAD_FIELDS = [("noise_size", "noise_size"), ("num_mlp_layers", "num_blocks"), ("num_samples", "num_samples"),
               ("beta", "alpha")]
CALM_REQUIRED = backbone.BACKBONE_REQUIRED + ("patch_size", "latent_size", "noise_size", "num_mlp_layers")


class CALMRelease(ReleaseAdapter):
    published_names = (ARCH_CALM, ARCH_CALM_OTHER_HEAD)
    model_types = ("energy",)
    embedded_ae_prefix = AE_PREFIX
    autoencoder = AE_RELEASE

    def published_name(self, cfg) -> str:
        return ARCH_CALM if cfg.head.type == "energy" else ARCH_CALM_OTHER_HEAD

    def known_config_keys(self, name: str) -> set[str]:
        return backbone.KNOWN_KEYS | {k for k, _ in CALM_FIELDS + HEAD_FIELDS}

    def release_config(self, cfg) -> dict:
        return {**backbone.release_config(cfg), **{key: getattr(cfg, ours) for key, ours in CALM_FIELDS},
                **{key: getattr(cfg.head, ours) for key, ours in HEAD_FIELDS}}

    def config_dict(self, values: dict, name: str, base: dict, cfg_path: Path) -> dict:
        require_keys(values, CALM_REQUIRED, cfg_path)
        fields = backbone.config_dict(values, base, cfg_path)
        if name == ARCH_CALM and values.get("model_type") not in (None, "", "energy"):
            raise ReleaseError(f"{cfg_path}: model_type {values['model_type']!r} with architecture {name}; "
                               f"only the energy head's layout is supported")
        head = dict(base.get("head") or {})
        if name == ARCH_CALM:
            head["type"] = "energy"
        elif "type" not in head:
            raise ReleaseError(f"{cfg_path}: architecture {name} needs the head type from {SIDECAR_NAME}, "
                               f"which is missing")
        head.update(mapped(values, HEAD_FIELDS))
        merged = {**base, **fields, **mapped(values, CALM_FIELDS), "head": head, "arch": "calm"}
        merged["ae_path"] = values.get("ae_path")  # an explicit null in config.json wins over the sidecar
        return merged

    def generation_config(self, cfg) -> dict:
        return backbone.generation_config(cfg)

    def from_release(self, tensors: dict, where: str, name: str, tie_word_embeddings: bool = False):
        # The AE copy and the head alias are optional (docs/release.md, 'How a CALM finds its AE'); if both
        # head names are present they are one module in the reference and must hold the same values.
        ae = {k[len(AE_PREFIX):]: v for k, v in tensors.items() if k.startswith(AE_PREFIX)} or None
        ours = {k: v for k, v in tensors.items() if not k.startswith((AE_PREFIX, HEAD_ALIAS_PREFIX))}
        for k, v in tensors.items():
            if k.startswith(HEAD_ALIAS_PREFIX):
                mine = HEAD_PREFIX + k[len(HEAD_ALIAS_PREFIX):]
                if mine in ours:
                    if not same_tensor(ours[mine], v):
                        raise ReleaseError(f"{where}: {mine} and {k} differ, but they are one module")
                else:
                    ours[mine] = v
        if ae is not None:
            AE_RELEASE.complete_state(ae, where)
        return ours, ae

    def to_release(self, cfg, state: Mapping[str, torch.Tensor], ae_state=None) -> dict:
        out = super().to_release(cfg, state, ae_state)
        if self.published_name(cfg) == ARCH_CALM:
            for k, v in state.items():
                if k.startswith(HEAD_PREFIX):  # two names in the reference: docs/release.md, 'CALM parameter names'
                    out[HEAD_ALIAS_PREFIX + k[len(HEAD_PREFIX):]] = v
        return out

    def embedded_ae_config(self, ae_state: Mapping[str, torch.Tensor], cfg, where: str) -> dict:
        """The embedded AE's shapes, and this CALM's token ids; the fields no shape tells (norm eps,
        training options) take the published AE's values (our defaults)."""
        ids = {n: getattr(cfg, n) for n in ("pad_token_id", "bos_token_id", "eos_token_id")}
        return {**AE_RELEASE.config_from_state(ae_state, where), **ids}

    def card_rows(self, cfg) -> list[tuple]:
        h = cfg.head
        return backbone.card_rows(cfg) + [
            ("K (tokens per latent)", cfg.k), ("latent dimension", cfg.latent_dim),
            ("head", f"{h.type}, {h.num_blocks} blocks, {h.num_samples} samples per position")]


RELEASE = CALMRelease()
