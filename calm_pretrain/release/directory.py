"""Writing a release directory so that it appears complete or not at all."""
from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from calm_pretrain.release.layout import CONFIG_NAME, ReleaseError


@contextmanager
def _atomic_directory(out_dir: Path) -> Iterator[Path]:
    """Yields a fresh temporary directory beside `out_dir`; on success it replaces `out_dir`, on any
    error (or interrupt) it is removed and `out_dir` is left as it was."""
    from data_pipeline.files import fsync_dir, fsync_file

    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ReleaseError(f"{out_dir}: exists and is not a directory")
        # Replacing is meant for re-exporting a release; never wipe an unrelated directory.
        if any(out_dir.iterdir()) and not (out_dir / CONFIG_NAME).is_file():
            raise ReleaseError(f"{out_dir}: exists, is not empty and holds no {CONFIG_NAME}; refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
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

