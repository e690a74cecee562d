"""``calm-pretrain export``: a training checkpoint → a release, without the silent mistakes.

- Which checkpoint: a run directory resolves to its newest intact checkpoint. The step exported is said,
  any newer checkpoint passed over (damaged, unfinished) is warned about, and both are recorded in the
  release (``calm_pretrain.json`` → ``source``: checkpoint, step, fallback).
- Which data: every checkpoint records the fingerprints of the tokenizer and (latent shards) of the
  autoencoder its training data was made with, or run in the step (``data.latents=on_the_fly``)
  (``trainer_state.json`` → ``data_sources``; older
  checkpoints: read from the manifests they name). An ``--embed-ae`` or ``--tokenizer`` that does not
  match is refused, naming both fingerprints: a release embedding another AE decodes into other tokens.
- Where: an existing release of another model is never replaced, nor the AE being embedded; one of the
  same run only with ``overwrite`` (``directory.check_replacement``).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Optional

from calm_pretrain.models.release_layout import ReleaseError, ReleaseWarning


def choose_checkpoint(path: str | os.PathLike) -> tuple[Path, Optional[str]]:
    """(the checkpoint to export, why newer ones were passed over or None). A checkpoint directory named
    explicitly is exported as it is (or refused when damaged, by the consolidation)."""
    from calm_pretrain.train.checkpoint import MANIFEST, resolve_checkpoint, verify_checkpoint

    path = Path(path)
    chosen = resolve_checkpoint(path)
    if (path / MANIFEST).is_file():
        return chosen, None
    newer = sorted((p for p in chosen.parent.glob("step_*") if p.is_dir() and p.name.split(".")[0] > chosen.name),
                   key=lambda p: p.name, reverse=True)
    reasons = []
    for p in newer:
        if p.name.endswith(".partial"):
            reasons.append(f"{p.name} is an unfinished save")
            continue
        problem = verify_checkpoint(p)
        reasons.append(f"{p.name} is damaged ({problem})" if problem else f"{p.name} is not the one `latest` names")
    return chosen, "; ".join(reasons) or None


def _data_sources(state: dict, ckpt: Path) -> Optional[dict]:
    """The fingerprints of the data a checkpoint was trained on (recorded, else from its manifests)."""
    if state.get("data_sources"):
        return state["data_sources"]
    from data_pipeline.errors import DataError
    from data_pipeline.manifest import load_manifest

    try:
        m = load_manifest(state["data"][0], check_files=False)
    except (KeyError, IndexError, TypeError, DataError, OSError):
        return None
    return {"kind": m.kind, "tokenizer_fingerprint": m.tokenizer_fingerprint, "tokenizer_spec": m.tokenizer.get("spec"),
            "ae_fingerprint": m.ae_fingerprint, "k": m.k, "latent_dim": m.latent_dim, "from": str(m.path)}


def _check_against_data(what: str, given: str, fingerprint: str, recorded: Optional[str], ckpt: Path) -> None:
    made = "latents encoded by the autoencoder" if what == "autoencoder" else "shards tokenized by the tokenizer"
    if recorded is not None and fingerprint != recorded:
        raise ReleaseError(f"{what} {given} has fingerprint {fingerprint}, but {ckpt} was trained on {made} of "
                           f"fingerprint {recorded}; refusing to export a release that does not match its model "
                           f"(give the {what} the training data was made with)")


def _unverifiable(what: str, ckpt: Path) -> None:
    warnings.warn(ReleaseWarning(f"{ckpt}: records no fingerprints of its training data (a checkpoint from before "
                                 f"they were recorded, and its manifests are gone): {what} is not checked"),
                  stacklevel=3)


def _run_fingerprint(state: dict) -> str:
    """One training run: its model, data and seed (a resumed run keeps all three)."""
    from data_pipeline.files import canonical_hash

    config = state.get("config") or {}
    return canonical_hash({"model": config.get("model"), "data_fingerprint": state.get("data_fingerprint"),
                           "seed": (config.get("train") or {}).get("seed")})


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *, tokenizer: Optional[str] = None,
                      embed_ae: Optional[str] = None, overwrite: bool = False,
                      say: Callable[[str], None] = print, eval_result: Optional[dict] = None) -> tuple[Path, dict]:
    """Consolidate a checkpoint (or a run directory's newest intact one) into the release `out`;
    returns (out, the recorded source)."""
    from calm_pretrain.release.export import export_state_dict
    from calm_pretrain.train.checkpoint import consolidated_state_dict, read_trainer_state

    out = Path(out)
    if embed_ae and Path(embed_ae).resolve() == out.resolve():
        raise ReleaseError(f"--out {out} is the autoencoder release given to --embed-ae; exporting there would "
                           f"delete the autoencoder being embedded (and the one the latents were encoded with)")
    ckpt, fallback = choose_checkpoint(checkpoint)
    state = read_trainer_state(ckpt)
    if fallback:
        warnings.warn(ReleaseWarning(f"exporting {ckpt} (step {state['step']}), not the newest checkpoint: "
                                     f"{fallback}"), stacklevel=2)
    say(f"exporting step {state['step']} from {ckpt}")
    sources = _data_sources(state, ckpt)
    source = {"checkpoint": str(ckpt.resolve()), "step": state["step"], "fallback": fallback,
              "run_directory": str(ckpt.resolve().parent.parent), "run_fingerprint": _run_fingerprint(state),
              "data": sources, "tokens": _tokens_seen(state)}
    tok = ae_state = ae_cfg = None
    if tokenizer:
        from data_pipeline.tokenizers import load_tokenizer

        tok = load_tokenizer(tokenizer)
        if sources is None:
            _unverifiable(f"--tokenizer {tokenizer}", ckpt)
        else:
            _check_against_data("tokenizer", tokenizer, tok.fingerprint, sources.get("tokenizer_fingerprint"), ckpt)
    if embed_ae:
        ae_state, ae_cfg, source["embedded_ae_fingerprint"] = _embedded_ae(embed_ae, sources, ckpt)
    state_dict, model_cfg = consolidated_state_dict(ckpt)
    export_state_dict(state_dict, model_cfg, out, tok, ae_state_dict=ae_state, ae_config=ae_cfg, source=source,
                      overwrite=overwrite, eval_result=eval_result)
    return out, source


def _tokens_seen(state: dict) -> Optional[int]:
    """Training tokens of a checkpoint: consumed samples × tokens per sample (None if not recorded)."""
    cfg = state.get("config") or {}
    try:
        return int(state["consumed_samples"]) * int(cfg["data"]["seq_chunks"]) * int(cfg["model"].get("k", 1))
    except (KeyError, TypeError, ValueError):
        return None


def _embedded_ae(embed_ae: str, sources: Optional[dict], ckpt: Path):
    """(state dict, config, fingerprint) of the AE release to embed, refused unless the CALM's latents
    were encoded by it."""
    from calm_pretrain.release.load import import_release
    from data_pipeline.ae_io import autoencoder_fingerprint

    ae, ae_cfg = import_release(embed_ae)
    fingerprint = autoencoder_fingerprint(ae)
    if sources is None:
        _unverifiable(f"--embed-ae {embed_ae}", ckpt)
    elif sources.get("kind") == "latents" or sources.get("latents") == "on_the_fly":  # trained on its latents
        _check_against_data("autoencoder", embed_ae, fingerprint, sources.get("ae_fingerprint"), ckpt)
    return ae.state_dict(), ae_cfg, fingerprint
