#!/usr/bin/env bash
# One-time (and idempotent) set-up of a fresh machine: torch, then this package and its dependencies.
# On a GPU cluster, install your usual CUDA build of torch first; this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  # The CPU wheel: an unpinned torch would pull several GB of CUDA wheels on a CPU-only machine.
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
# DeepSpeed's C++/CUDA ops are JIT-compiled on first use instead of at install time.
DS_BUILD_OPS=0 "$PY" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
