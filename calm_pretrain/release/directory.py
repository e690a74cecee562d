"""Writing a release directory: it appears complete or not at all, never replaces a release of another
model, and leaves nothing behind that a later export does not clean up.

Temporary names carry who wrote them: ``.NAME.tmp-HOST-PID-RANDOM`` while an export writes, and
``.NAME.old-HOST-PID-RANDOM`` for the moment the previous release is moved aside. An export killed
(``kill -9``, a node lost) leaves them behind; the next export into the same place removes those whose
process is gone (same host, pid not alive) and puts a set-aside previous release back if the kill came
between the two renames. Directories of a live export, or of another host (the pid means nothing here),
are left alone.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from calm_pretrain.models.release_layout import CONFIG_NAME, SIDECAR_NAME, ReleaseError, ReleaseWarning

# A name part that cannot hold the "-" separating host, pid and random tag.
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
# .NAME.tmp-HOST-PID-HEX (this code), or .NAME.tmp-PID-HEX (older exports, which recorded no host)
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<host>[^-]+)-)?(?P<pid>\d+)-[0-9a-f]+$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_temporaries(out_dir: Path) -> list[Path]:
    """Temporary directories of earlier exports to `out_dir` whose process is gone."""
    out = []
    if not out_dir.parent.is_dir():
        return out
    for p in out_dir.parent.iterdir():
        m = _TEMP.match(p.name)
        if not m or m["name"] != out_dir.name or not p.is_dir():
            continue
        if m["host"] not in (None, _HOST):
            continue  # another node's export: its pid cannot be checked from here
        if not _pid_alive(int(m["pid"])):
            out.append(p)
    return out


def clean_stale_temporaries(out_dir: Path) -> None:
    """Remove what killed exports to `out_dir` left; restore a previous release they had set aside."""
    for p in sorted(stale_temporaries(out_dir), key=lambda p: ".old-" not in p.name):  # restores first
        if ".old-" in p.name and not out_dir.exists():
            os.replace(p, out_dir)
            warnings.warn(ReleaseWarning(f"{out_dir}: restored the previous release from {p.name}, set aside by an "
                                         f"export that was killed before it finished"), stacklevel=3)
            continue
        shutil.rmtree(p, ignore_errors=True)
        warnings.warn(ReleaseWarning(f"{out_dir.parent}: removed {p.name}, left by an export that was killed "
                                     f"(process gone)"), stacklevel=3)


@contextmanager
def atomic_directory(out_dir: Path) -> Iterator[Path]:
    """Yields a fresh temporary directory beside `out_dir`; on success it replaces `out_dir`, on any
    error (or interrupt) it is removed and `out_dir` is left as it was."""
    from data_pipeline.files import fsync_dir, fsync_file

    out_dir = Path(out_dir)
    clean_stale_temporaries(out_dir)
    _refuse_non_release(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{tag}")
    tmp.mkdir()
    try:
        yield tmp
        for p in tmp.iterdir():
            if p.is_file():
                fsync_file(p)
        fsync_dir(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{tag}")
            os.replace(out_dir, old)
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                os.replace(old, out_dir)  # put the previous release back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _refuse_non_release(out_dir: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ReleaseError(f"{out_dir}: exists and is not a directory")
        # Replacing is meant for re-exporting a release; never wipe an unrelated directory.
        if any(out_dir.iterdir()) and not (out_dir / CONFIG_NAME).is_file():
            raise ReleaseError(f"{out_dir}: exists, is not empty and holds no {CONFIG_NAME}; refusing to replace it")


# --------------------------------------------------------------------------------------------
# Replacing an existing release
# --------------------------------------------------------------------------------------------
# Fields that change with every export of one model and say nothing about which model it is.
_VOLATILE = ("torch_dtype", "transformers_version")


def _existing(out_dir: Path) -> Optional[tuple[dict, dict]]:
    """(config.json values, sidecar or {}) of the release in `out_dir`, or None when there is none."""
    cfg_path = out_dir / CONFIG_NAME
    if not cfg_path.is_file():
        return None
    try:
        values = json.loads(cfg_path.read_text())
        side = out_dir / SIDECAR_NAME
        sidecar = json.loads(side.read_text()) if side.is_file() else {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReleaseError(f"{out_dir}: holds a release whose files are unreadable ({e}); refusing to replace "
                           f"what cannot be identified: delete it first or choose another directory") from None
    if not isinstance(values, dict) or not isinstance(sidecar, dict):
        raise ReleaseError(f"{out_dir}: holds a release that cannot be identified; refusing to replace it")
    return values, sidecar


def _architecture(values: dict, sidecar: dict) -> str:
    from calm_pretrain.models import architectures

    archs = values.get("architectures")
    if isinstance(archs, list) and archs:
        return str(archs[0])
    spec = architectures().get(values.get("arch")) if isinstance(values.get("arch"), str) else None
    if spec is not None and spec.encodes_latents and spec.release is not None:  # our AE directory format
        return spec.release.published_names[0]
    return str(sidecar.get("architecture") or values.get("arch") or "unknown")


def _describe(sidecar: dict) -> str:
    src = sidecar.get("source") or {}
    if src.get("step") is not None:
        return f"step {src['step']} of {src.get('checkpoint', 'an unknown checkpoint')}"
    return "no record of its source"


def check_replacement(out_dir: Path, arch: str, config_values: dict, model: dict, source: Optional[dict],
                      overwrite: bool) -> None:
    """Refuse to replace the release in `out_dir` by a release of another model; replacing one of the
    same run needs `overwrite`, except a re-export of the very same checkpoint (nothing is lost)."""
    from calm_pretrain.release.fingerprint import config_diff

    found = _existing(Path(out_dir))
    if found is None:
        return
    values, sidecar = found
    hint = "choose another --out, or delete it first if it is really not needed (configs and latent " \
           "manifests may point to it)"
    old_arch = _architecture(values, sidecar)
    if old_arch != arch:
        raise ReleaseError(f"{out_dir}: holds a release of another model ({old_arch}, {_describe(sidecar)}), not "
                           f"{arch}; refusing to replace it: {hint}")
    # Keys both have: a published config.json may carry bookkeeping keys ours does not write.
    common = [k for k in values if k in config_values and k not in _VOLATILE]
    old, new = {k: values[k] for k in common}, {k: config_values[k] for k in common}
    changes = config_diff(old, new)
    if isinstance(sidecar.get("model"), dict):
        changes += config_diff(sidecar["model"], model)
    if changes:
        raise ReleaseError(f"{out_dir}: holds a release of another {arch} model (differs in: "
                           f"{'; '.join(changes[:5])}); refusing to replace it: {hint}")
    old_src = sidecar.get("source") or {}
    if source and old_src.get("run_fingerprint") and old_src["run_fingerprint"] != source.get("run_fingerprint"):
        raise ReleaseError(f"{out_dir}: holds a release of another training run of this model ({_describe(sidecar)}, "
                           f"run fingerprint {old_src['run_fingerprint']}; this one is "
                           f"{source.get('run_fingerprint')}); refusing to replace it: {hint}")
    if source and all(old_src.get(k) == source.get(k) for k in ("run_fingerprint", "checkpoint", "step")):
        return  # the same checkpoint exported again
    if not overwrite:
        now = f"step {source['step']}" if source and source.get("step") is not None else "a new export"
        raise ReleaseError(f"{out_dir}: already holds a release of this model ({_describe(sidecar)}); replacing it "
                           f"with {now} needs --overwrite (overwrite=True)")
