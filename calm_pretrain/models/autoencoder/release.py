"""The autoencoder's release adapter: the published ``Autoencoder`` (docs/release.md, 'Autoencoder
config.json', 'Autoencoder parameter names', 'The tied AE embedding'). Our module already uses the
published parameter names; the decoder's output projection is the token embedding under a second name."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from calm_pretrain.models.release_layout import (ReleaseAdapter, ReleaseError, check_constants, require_keys, mapped,
                                          same_tensor)

ARCH_AE = "Autoencoder"
# The one tied weight, under both of its names.
AE_TIED = ("encoder.embed_tokens.weight", "decoder.lm_head_weight")

# (release key, our field). Explicit, because several names differ (patch_size = k, ...).
AE_FIELDS = [
    ("patch_size", "k"), ("latent_size", "latent_dim"), ("vocab_size", "vocab_size"),
    ("hidden_size", "hidden_size"), ("intermediate_size", "intermediate_size"),
    ("num_encoder_layers", "num_encoder_layers"), ("num_decoder_layers", "num_decoder_layers"),
    ("rms_norm_eps", "norm_eps"), ("ae_dropout", "token_mask_prob"), ("kl_clamp", "kl_clamp"),
    ("kl_weight", "kl_weight"), ("initializer_range", "init_std"),
    ("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "pad_token_id"),
]
# What the reference AE hard-wires (no field of ours): SwiGLU with SiLU, no MLP biases, the tie is not
# HF's tie_word_embeddings, max_position_embeddings is unused.
AE_CONSTANTS = {"hidden_act": "silu", "mlp_bias": False, "pretraining_tp": 1, "max_position_embeddings": 2048,
                "tie_word_embeddings": False}
AE_REQUIRED = ("patch_size", "latent_size", "vocab_size", "hidden_size", "intermediate_size",
               "num_encoder_layers", "num_decoder_layers")


class AutoencoderRelease(ReleaseAdapter):
    published_names = (ARCH_AE,)

    def known_config_keys(self, name: str) -> set[str]:
        return {k for k, _ in AE_FIELDS} | set(AE_CONSTANTS)

    def release_config(self, cfg) -> dict:
        return {**{key: getattr(cfg, ours) for key, ours in AE_FIELDS}, **AE_CONSTANTS}

    def config_dict(self, values: dict, name: str, base: dict, cfg_path: Path) -> dict:
        require_keys(values, AE_REQUIRED, cfg_path)
        check_constants(values, AE_CONSTANTS, cfg_path, ("hidden_act", "mlp_bias"))
        merged = {**base, **mapped(values, AE_FIELDS), "arch": "autoencoder"}
        # The reference uses one ae_dropout for token masking and latent dropout; ours may differ (sidecar).
        if "latent_dropout" not in base and values.get("ae_dropout") is not None:
            merged["latent_dropout"] = values["ae_dropout"]
        return merged

    def complete_state(self, state: dict, where: str) -> None:
        """Our AE holds one Parameter under both tied names, so either name alone suffices to load it (our
        exports always write both, which the reference loader needs: docs/release.md, 'The tied AE
        embedding'); when both are given they must agree."""
        a, b = AE_TIED
        if a in state and b in state:
            if not same_tensor(state[a], state[b]):
                raise ReleaseError(f"{where}: {a} and {b} differ, but they are one tied weight")
        elif a in state:
            state[b] = state[a]
        elif b in state:
            state[a] = state[b]

    def check_loaded(self, model, where: str) -> None:
        if model.decoder.lm_head_weight is not model.encoder.embed_tokens.weight:
            raise ReleaseError(f"{where}: the decoder's output projection is no longer tied to the embedding")

    def unique_parameters(self, state: Mapping[str, torch.Tensor]) -> int:
        # both tied names are present after from_release; the pair counts once
        return sum(t.numel() for k, t in state.items() if k != AE_TIED[1])

    def config_from_state(self, state: Mapping[str, torch.Tensor], where: str) -> dict:
        """Our config fields that the tensor shapes tell (a reference CALM file carries no AE config)."""
        try:
            vocab, hidden = state["encoder.embed_tokens.weight"].shape
            inter = state["encoder.encoder_layers.0.mlp.gate_proj.weight"].shape[0]
            latent = state["decoder.latent_to_hidden.weight"].shape[1]
            k = state["encoder.squeeze_layer.weight"].shape[1] // hidden
        except KeyError as e:
            raise ReleaseError(f"{where}: embedded autoencoder lacks {e.args[0]}") from None

        def layers(prefix: str) -> int:
            return len({n[len(prefix):].split(".")[0] for n in state if n.startswith(prefix)})

        return {"arch": "autoencoder", "k": k, "latent_dim": latent, "vocab_size": vocab, "hidden_size": hidden,
                "intermediate_size": inter, "num_encoder_layers": layers("encoder.encoder_layers."),
                "num_decoder_layers": layers("decoder.decoder_layers.")}

    def card_rows(self, cfg) -> list[tuple]:
        return [("K (tokens per latent)", cfg.k), ("latent dimension", cfg.latent_dim),
                ("hidden / FFN", f"{cfg.hidden_size} / {cfg.intermediate_size}"),
                ("encoder / decoder layers", f"{cfg.num_encoder_layers} / {cfg.num_decoder_layers}")]


RELEASE = AutoencoderRelease()
