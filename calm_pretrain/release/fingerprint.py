"""A release's fingerprint: what was exported, so that a loader tells an edited file from the release as
it was written and names what changed.

A ``config.json`` edited without changing any shape (``rope_theta``, ``rms_norm_eps``, the head count at
the same ``head_dim``) loads into a model that computes something else, and no name or shape check can
see it. So an export records, in our sidecar ``calm_pretrain.json`` under ``fingerprint``:

- ``config.json``: a copy of the values written (a mismatch names the changed keys and both values);
- ``calm_pretrain.json``: a copy of the rest of the sidecar (our full configs, the export's source);
- ``files``: size and sha256 of every weight file (and shard index);
- ``digest``: one hash of the three, the release's identity (see ``directory.check_replacement``).

The data pipeline's native AE directories (``calm_pretrain.release.autoencoder.save_autoencoder``) have no sidecar; they
keep the same record in ``fingerprint.json``. A directory without a record (the published checkpoints,
exports older than fingerprints) still loads, reported as unverified.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from data_pipeline.files import canonical_hash, sha256_file

FINGERPRINT_KEY = "fingerprint"
NATIVE_FINGERPRINT = "fingerprint.json"  # native AE directories: no sidecar to hold the record
FINGERPRINT_VERSION = 1
UNVERIFIED = ("unverified: no fingerprint recorded (the published layout, or an export older than "
              "fingerprints); config.json and the weights are taken as they are")


def file_digests(d: Path, names) -> dict[str, list]:
    """{file name: [bytes, sha256]} of the files `names` in `d`."""
    return {name: [(d / name).stat().st_size, sha256_file(d / name)] for name in sorted(names)}


def make_record(d: Path, config_values: dict, sidecar: Optional[dict], weight_names) -> dict:
    """The fingerprint record of a directory whose files are written (the sidecar's own record excluded)."""
    rest = {k: v for k, v in (sidecar or {}).items() if k != FINGERPRINT_KEY}
    record = {"version": FINGERPRINT_VERSION, "config.json": config_values, "calm_pretrain.json": rest,
              "files": file_digests(d, weight_names)}
    record["digest"] = canonical_hash({k: record[k] for k in ("config.json", "calm_pretrain.json", "files")})
    return record


def stored_record(d: Path, sidecar: Optional[dict]) -> Optional[dict]:
    """The record written at export (sidecar, or ``fingerprint.json`` of a native AE directory), or None."""
    if sidecar and isinstance(sidecar.get(FINGERPRINT_KEY), dict):
        return sidecar[FINGERPRINT_KEY]
    path = d / NATIVE_FINGERPRINT
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            return {"unreadable": f"{path}: unreadable ({e})"}
        return record if isinstance(record, dict) else {"unreadable": f"{path}: not a fingerprint record"}
    return None


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """'key: old -> new' for every leaf that differs (nested dicts by dotted keys)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            name = f"{prefix}{key}"
            if key not in new:
                out.append(f"{name}: {json.dumps(old[key])} -> (removed)")
            elif key not in old:
                out.append(f"{name}: (added) -> {json.dumps(new[key])}")
            else:
                out.extend(config_diff(old[key], new[key], name + "."))
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {json.dumps(old)} -> {json.dumps(new)}"]


def mismatches(d: Path, config_values: dict, sidecar: Optional[dict], weight_names,
               check_files: bool = True) -> Optional[list[str]]:
    """None when `d` has no record; else what differs from it (empty: verified). Weight files are hashed
    unless `check_files` is false."""
    record = stored_record(d, sidecar)
    if record is None:
        return None
    if "unreadable" in record:
        return [record["unreadable"]]
    if record.get("version") != FINGERPRINT_VERSION:
        return [f"fingerprint version {record.get('version')!r}; this code reads {FINGERPRINT_VERSION}"]
    problems = [f"config.json {p}" for p in config_diff(record.get("config.json"), config_values)]
    rest = {k: v for k, v in (sidecar or {}).items() if k != FINGERPRINT_KEY}
    if sidecar is not None:
        problems += [f"calm_pretrain.json {p}" for p in config_diff(record.get("calm_pretrain.json"), rest)]
    recorded = record.get("files") or {}
    now = set(weight_names)
    for name in sorted(set(recorded) - now):
        problems.append(f"weight file {name} is gone")
    for name in sorted(now - set(recorded)):
        problems.append(f"weight file {name} was added")
    if check_files:
        for name, (size, digest) in sorted(file_digests(d, now & set(recorded)).items()):
            if [size, digest] != list(recorded[name]):
                problems.append(f"weight file {name} changed ({recorded[name][0]:,} -> {size:,} bytes, "
                                f"sha256 differs)" if size != recorded[name][0] else
                                f"weight file {name} changed (same size, sha256 differs)")
    return problems


def describe_mismatch(d: Path, problems: list[str]) -> str:
    """One message for a release whose files differ from its fingerprint."""
    where = d / ("calm_pretrain.json" if (d / "calm_pretrain.json").is_file() else NATIVE_FINGERPRINT)
    return (f"{d}: differs from what was exported (fingerprint in {where}): " + "; ".join(problems)
            + ". Re-export it; if the edit is intended, remove the 'fingerprint' record to load it unverified")


def write_native_record(d: str | os.PathLike, config_values: dict, weight_names) -> Path:
    """``fingerprint.json`` of a native AE directory (written after its config and weights)."""
    from data_pipeline.files import atomic_write_json

    d = Path(d)
    atomic_write_json(d / NATIVE_FINGERPRINT, make_record(d, config_values, None, weight_names))
    return d / NATIVE_FINGERPRINT
