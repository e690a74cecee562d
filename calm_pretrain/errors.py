"""The trainer's file errors (importable without torch): every message names the file it is about."""
from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint or run directory that cannot be used as it is (damaged, changed, locked, unsafe)."""
