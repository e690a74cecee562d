"""`python -m calm_pretrain.sweep ...`: the command line of calm_pretrain/sweep/cli.py (the plan's stage
scripts run the sweep this way)."""
import sys

from calm_pretrain.sweep.cli import main

sys.exit(main())
