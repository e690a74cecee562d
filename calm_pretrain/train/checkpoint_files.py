"""A checkpoint's manifest: what every rank claims it wrote, and what every rank verifies.

Saving: each rank hashes the files it writes as it writes them (``parallel/hashed_writes.py``) and
reports ``{relative path: (size, digest, rank)}``; rank 0 merges the reports (:func:`merge_claims`) and
checks them against the files actually present: a file no rank claims, a file two ranks claim, or a
claimed file that is not there is an error naming it. The manifest records each file's writer.

Verifying: rank 0 reads the manifest and checks presence and sizes (:func:`check_manifest`); then every
rank checksums its share (:func:`share_of`): at the world size that saved the checkpoint, the files the
manifest says it wrote; otherwise (or for a manifest without writers) a deterministic split by size.
The problems are all-gathered, so every rank takes the same decision. :func:`verify_checkpoint` does
all of it in one process (export, eval, tools).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from data_pipeline.files import HASHES, file_digest

MANIFEST = "manifest.json"


def read_manifest(path: Path) -> tuple[Optional[dict], Optional[str]]:
    """(manifest, None), or (None, what is wrong) when `path` has no readable manifest."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        return None, "no manifest.json (the save did not finish)"
    try:
        return json.loads(manifest_path.read_text()), None
    except (OSError, json.JSONDecodeError) as e:
        return None, f"unreadable manifest.json ({e})"


def check_manifest(path: Path) -> tuple[Optional[dict], Optional[str]]:
    """(manifest, None) if every file the manifest lists is there with its size; else (None, problem).
    Reads no file's bytes."""
    manifest, problem = read_manifest(path)
    if problem:
        return None, problem
    if hash_of(manifest) not in HASHES:
        return None, f"{MANIFEST} names an unknown hash {hash_of(manifest)!r} (this version knows {HASHES})"
    for rel, entry in manifest["files"].items():
        f = Path(path) / rel
        if not f.is_file():
            return None, f"missing file {rel}"
        if f.stat().st_size != entry[0]:
            return None, f"{rel} has {f.stat().st_size} bytes, the manifest says {entry[0]}"
    return manifest, None


def hash_of(manifest: dict) -> str:
    """The hash a manifest's digests are in (manifests from before it was recorded: SHA-256)."""
    return manifest.get("hash", "sha256")


def checksum_problems(path: Path, manifest: dict, names) -> list[str]:
    """The first checksum mismatch among the manifest's files `names`, in name order."""
    files, algorithm = manifest["files"], hash_of(manifest)
    for rel in sorted(names):
        if file_digest(Path(path) / rel, algorithm) != files[rel][1]:
            return [f"{rel} does not match its checksum"]
    return []


def share_of(manifest: dict, rank: int, world_size: int) -> list[str]:
    """The files of `manifest` that `rank` of `world_size` checksums: those it wrote, when the manifest
    records writers at this world size; otherwise a split by size (largest first, to the rank with the
    fewest bytes so far, ties to the lower rank; the same on every rank)."""
    files = manifest["files"]
    writers = [entry[2] if len(entry) > 2 else None for entry in files.values()]
    if manifest.get("world_size") == world_size and None not in writers:
        return sorted(rel for rel, entry in files.items() if entry[2] == rank)
    load = [0] * world_size
    mine = []
    for rel in sorted(files, key=lambda r: (-files[r][0], r)):
        r = min(range(world_size), key=lambda i: (load[i], i))
        load[r] += files[rel][0]
        if r == rank:
            mine.append(rel)
    return sorted(mine)


def verify_checkpoint(path: Path, checksums: bool = True) -> Optional[str]:
    """None if `path` is a complete, intact checkpoint; otherwise what is wrong with it (one process
    reads and checksums every file)."""
    manifest, problem = check_manifest(Path(path))
    if problem or not checksums:
        return problem
    found = checksum_problems(Path(path), manifest, manifest["files"])
    return found[0] if found else None


def merge_claims(root: Path, claims: list[dict]) -> tuple[dict, Optional[str]]:
    """The manifest's files from every rank's claims {rel: (size, digest, rank)}, checked against the
    files under `root`: (files, None), or (files, the problem naming each file that is wrong)."""
    files, problems = {}, []
    for part in claims:
        for rel, entry in part.items():
            if rel in files:
                problems.append(f"{rel} is claimed by ranks {files[rel][2]} and {entry[2]}")
            files[rel] = list(entry)
    present = {str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file()}
    problems += [f"{rel} was written but no rank hashed it as its own" for rel in sorted(present - set(files))]
    problems += [f"{rel} is claimed by rank {files[rel][2]} but missing" for rel in sorted(set(files) - present)]
    problems += [f"{rel}: rank {files[rel][2]} hashed {files[rel][0]} bytes, the file has "
                 f"{(Path(root) / rel).stat().st_size}" for rel in sorted(present & set(files))
                 if (Path(root) / rel).stat().st_size != files[rel][0]]
    return files, "; ".join(problems) or None
