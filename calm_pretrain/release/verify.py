"""Checking a release against its fingerprint before it is used (import, ``load_autoencoder``,
``release-info``); see ``fingerprint.py`` for what is recorded."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Optional, TypeVar

from calm_pretrain.release.files import weight_files
from calm_pretrain.release.fingerprint import UNVERIFIED, describe_mismatch, mismatches
from calm_pretrain.models.release_layout import CONFIG_NAME, ReleaseError, ReleaseWarning

T = TypeVar("T")


def unknown_config_keys(values: dict, kind) -> list[str]:
    """config.json keys no loader of ours reads for the published architecture `kind` (an
    adapters.Published; our native AE directories are checked field by field)."""
    known = kind.known_config_keys()
    return [] if known is None else sorted(k for k in values if k not in known)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """One warning per message and process: a command that reads a release several times (its CALM,
    then its embedded AE) says it once. A different file or a changed release is a new message."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(ReleaseWarning(message), stacklevel=4)


def verify_release(d: Path, values: dict, sidecar: Optional[dict], kind, *, warn: bool = True) -> dict:
    """{"status": "verified" | "unverified" | "mismatch", "problems": [...], "unknown_fields": [...]}.
    With `warn`, an unverified release and unknown config.json fields are reported as ReleaseWarnings."""
    _, files = weight_files(d)
    problems = mismatches(d, values, sidecar, [f.name for f in files])
    status = "unverified" if problems is None else ("mismatch" if problems else "verified")
    unknown = unknown_config_keys(values, kind)
    if warn and status == "unverified":
        _warn_once(f"{d}: {UNVERIFIED}")
    if warn and unknown:
        _warn_once(f"{d / CONFIG_NAME}: field(s) {', '.join(unknown)} are not read by calm_pretrain "
                   f"(ignored: a setting there has no effect)")
    return {"status": status, "problems": problems or [], "unknown_fields": unknown}


def verified_load(d: Path, values: dict, sidecar: Optional[dict], kind, load: Callable[[], T]) -> T:
    """`load()`, refused when the release differs from its fingerprint. The name and shape checks inside
    `load` run first, as they say most about a broken file; an edit that broke them is named with them."""
    report = verify_release(d, values, sidecar, kind)
    try:
        result = load()
    except ReleaseError as e:
        if report["problems"]:
            raise ReleaseError(f"{e}. {describe_mismatch(d, report['problems'])}") from None
        raise
    if report["problems"]:
        raise ReleaseError(describe_mismatch(d, report["problems"]))
    return result
