"""The frozen autoencoder's own directory: ``config.json`` + ``model.safetensors`` + ``fingerprint.json``,
written by :func:`save_autoencoder` and read by :func:`load_autoencoder` (which also reads a release
directory of an autoencoder, ours or a published one).

- ``config.json``: ``dataclasses.asdict(AutoencoderConfig)``.
- ``fingerprint.json``: config.json and the weights' sha256 as written (``calm_pretrain.release.fingerprint``).
- ``model.safetensors``: the state dict. The decoder's output projection is the encoder's token
  embedding (one tied Parameter); both names are stored as separate tensors (safetensors refuses shared
  storage) and loading checks they are equal, loads strictly and checks the tie survived.

What identifies an autoencoder's encoding (its fingerprint) is data_pipeline.ae_io's: the data
pipeline records it in every latent manifest without loading anything from here.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from data_pipeline.errors import DataError
from data_pipeline.files import atomic_write_bytes, fsync_dir, tmp_path_for

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TIED = ("encoder.embed_tokens.weight", "decoder.lm_head_weight")


def save_autoencoder(ae, directory: str | os.PathLike) -> Path:
    """Write `ae` (a calm_pretrain Autoencoder) to `directory`; files appear complete or not at all."""
    from safetensors.torch import save_file

    from calm_pretrain.release.fingerprint import write_native_record

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().to("cpu").clone().contiguous() for name, t in ae.state_dict().items()}
    weights = d / WEIGHTS_NAME
    tmp = tmp_path_for(weights)
    save_file(state, str(tmp), metadata={"format": "pt", "calm": "autoencoder"})
    os.replace(tmp, weights)
    atomic_write_bytes(d / CONFIG_NAME, (json.dumps(dataclasses.asdict(ae.config), indent=1) + "\n").encode())
    # Last: a loader compares config.json and the weights with this record and names any edit.
    write_native_record(d, dataclasses.asdict(ae.config), [WEIGHTS_NAME])
    fsync_dir(d)
    return d


def load_autoencoder(directory: str | os.PathLike, device: str | torch.device = "cpu"):
    """Read an autoencoder written by :func:`save_autoencoder`; eval mode, no gradients, on `device`."""
    from safetensors.torch import load_file

    from calm_pretrain.config import ConfigError, model_config_from_dict
    from calm_pretrain.models.autoencoder.model import Autoencoder

    d = Path(directory)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if (d / "calm_pretrain.json").is_file() or _is_reference_config(cfg_path):
        return _load_release(d, device)  # a release directory (calm-pretrain export, or a published one)
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise DataError(f"autoencoder directory {d}: {p.name} is missing")
    try:
        values = json.loads(cfg_path.read_text())
        values.setdefault("arch", "autoencoder")
        cfg = model_config_from_dict(values)
    except (json.JSONDecodeError, ConfigError) as e:
        raise DataError(f"{cfg_path}: not a valid autoencoder config ({e})") from None
    if getattr(cfg, "arch", None) != "autoencoder":
        raise DataError(f"{cfg_path}: arch is {cfg.arch!r}, not 'autoencoder'")
    try:
        state = load_file(str(w_path))
    except Exception as e:  # noqa: BLE001 - safetensors raises SafetensorError / OSError
        raise DataError(f"{w_path}: cannot read weights ({e})") from None
    if TIED[0] in state and TIED[1] in state and not torch.equal(state[TIED[0]], state[TIED[1]]):
        raise DataError(f"{w_path}: {TIED[0]} and {TIED[1]} differ, but they are one tied weight")
    ae = Autoencoder(cfg)
    try:
        ae.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DataError(f"{w_path}: weights do not match the config in {cfg_path} ({e})") from None
    if ae.decoder.lm_head_weight is not ae.encoder.embed_tokens.weight:
        raise DataError(f"{w_path}: the decoder's output projection is no longer tied to the embedding")
    _check_fingerprint(d, json.loads(cfg_path.read_text()))  # after the checks that say more about a broken file
    ae.requires_grad_(False)
    return ae.to(device).eval()


def _check_fingerprint(d: Path, values: dict) -> None:
    """Refuse a directory whose config.json or weights differ from the ones written (an edited norm eps
    or a swapped weight file would encode differently under the same name); say so when unrecorded."""
    import warnings

    from calm_pretrain.release.fingerprint import UNVERIFIED, describe_mismatch, mismatches
    from calm_pretrain.models.release_layout import ReleaseWarning

    problems = mismatches(d, values, None, [WEIGHTS_NAME])
    if problems is None:
        warnings.warn(ReleaseWarning(f"autoencoder directory {d}: {UNVERIFIED}"), stacklevel=3)
    elif problems:
        raise DataError(describe_mismatch(d, problems))


def _is_reference_config(cfg_path: Path) -> bool:
    """config.json in the published reference layout (its `patch_size` is our `k`)."""
    try:
        return "patch_size" in json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def _load_release(d: Path, device):
    from calm_pretrain.models.release_layout import ReleaseError
    from calm_pretrain.release.load import import_release

    try:
        ae, cfg = import_release(d)
    except ReleaseError as e:
        raise DataError(str(e)) from None
    if getattr(cfg, "arch", None) != "autoencoder":
        raise DataError(f"{d}: holds a {cfg.arch} release, not an autoencoder")
    ae.eval().requires_grad_(False)
    return ae.to(device)
