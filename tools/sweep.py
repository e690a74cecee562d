#!/usr/bin/env python3
"""Scaling-law sweeps: `plan`, `collect`, `fit`, `plot` (and `export-ae`, used by the plan's jobs).

    python3 tools/sweep.py plan configs/sweeps/scaling.yaml --out plans/scaling
    bash plans/scaling/submit.sh
    python3 tools/sweep.py collect plans/scaling --out results/scaling.csv
    python3 tools/sweep.py fit results/scaling.csv --out results/fit.json
    python3 tools/sweep.py plot results/scaling.csv --fit results/fit.json --out results/plots

The same command line as `calm-sweep` and `python -m calm_pretrain.sweep` (the package installed, as
`pip install -e .` does); the implementation and the sweep file format are in calm_pretrain/sweep/.
"""
import sys

from calm_pretrain.sweep.cli import main

if __name__ == "__main__":
    sys.exit(main())
