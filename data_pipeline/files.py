"""The project's one io module (both packages import it): atomic writes (temporary name, fsync, rename),
JSONL records, hashing, and telling a local path from a hub name."""
from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path
from typing import Any, Iterable, Optional

TMP_MARK = ".tmp-"


def tmp_path_for(path: Path) -> Path:
    """A temporary name beside `path`, unique per process, that no reader mistakes for a finished file."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def is_tmp_name(name: str) -> bool:
    return name.startswith(".") and TMP_MARK in name


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some file systems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either absent, the old content, or all of `data`."""
    path = Path(path)
    tmp = tmp_path_for(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file (none if it is missing); a line cut short by a kill is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def append_jsonl(path: Path, record: dict) -> None:
    """One record as one line (strict JSON: a NaN or infinity is refused, not written as bare NaN)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")


# Checkpoints are hashed with XXH3-128 (about 9 GB/s on one core here, against SHA-256's 1.1): their
# hash guards against torn writes and bit rot, and a non-cryptographic 128-bit hash detects those as
# well as SHA-256 does, while SHA-256 at tens of GB would be most of a resume. It protects against
# nobody forging a file anyway: whoever can change a file can change the manifest beside it (safe
# loading, not the hash, is what keeps a hostile file harmless). Data shards and releases keep SHA-256.
HASHES = ("sha256", "xxh3_128")


def new_hash(algorithm: str):
    """A hashlib-style object (update, hexdigest) for one of HASHES."""
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128()
    raise ValueError(f"unknown hash algorithm {algorithm!r} (expected one of {HASHES})")


def file_digest(path: Path, algorithm: str = "sha256", window: int = 1 << 26) -> str:
    """Hex digest of a file's bytes, read through a memory map (no copy into Python; both hashes
    release the GIL while they run)."""
    h = new_hash(algorithm)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:  # an empty file cannot be mapped
            return h.hexdigest()
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError:  # a file system without mmap (some FUSE mounts): plain reads
            while block := f.read(window):
                h.update(block)
            return h.hexdigest()
        with mapped:
            view = memoryview(mapped)
            try:
                for start in range(0, size, window):
                    h.update(view[start:start + window])
            finally:
                view.release()
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    return file_digest(path, "sha256")


def canonical_hash(obj: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys), first `length` hex digits."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def remove_stale_tmp(directory: Path, only_for: Optional[Iterable[str]] = None) -> int:
    """Delete temporary files left by an interrupted writer; returns how many.

    `only_for` limits this to the temporaries of the given final names (so that one encode rank never
    removes a file another rank is writing right now)."""
    n = 0
    if not Path(directory).is_dir():
        return 0
    wanted = None if only_for is None else set(only_for)
    for p in Path(directory).iterdir():
        if not is_tmp_name(p.name):
            continue
        final = p.name[1:].split(TMP_MARK)[0]
        if (wanted is None or final in wanted) and p.is_file():
            try:
                p.unlink()
                n += 1
            except FileNotFoundError:
                pass
    return n


# Endings of data and text files; a hub name ("owner/name", which may hold dots: "the-stack-v1.2") has none.
_FILE_ENDINGS = (".json", ".jsonl", ".txt", ".text", ".md", ".csv", ".tsv", ".parquet", ".arrow", ".gz", ".zst",
                 ".bz2", ".xz", ".model")


def looks_like_local_path(name: str) -> bool:
    """Whether `name` can only mean a file or directory here, never a hub name (``name`` or ``owner/name``):
    so that a mistyped path is reported as missing instead of being looked up on the hub."""
    name = str(name)
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return True
    if name.lower().endswith(_FILE_ENDINGS):
        return True
    first = name.split("/", 1)[0]
    return "/" in name and os.path.isdir(first)  # inside a directory that exists here
