#!/usr/bin/env python3
"""Scaling-law sweeps: `plan`, `collect`, `fit`, `plot` (and `export-ae`, used by the plan's jobs).

    python3 tools/sweep.py plan configs/sweeps/scaling.yaml --out plans/scaling
    bash plans/scaling/submit.sh
    python3 tools/sweep.py collect plans/scaling --out results/scaling.csv
    python3 tools/sweep.py fit results/scaling.csv --out results/fit.json
    python3 tools/sweep.py plot results/scaling.csv --fit results/fit.json --out results/plots

The implementation (and the sweep file format) is calm_pretrain/sweep.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calm_pretrain.sweep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
