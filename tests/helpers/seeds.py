"""Seeds of the tests that draw something at random (e.g. the step at which a run is killed).

Each run draws a fresh seed, so repeated CI runs cover different draws, and prints it; the test puts
it in its failure messages too. `CALM_TEST_SEED=<seed> python -m pytest ...` replays that draw.
"""
from __future__ import annotations

import os
import secrets

ENV = "CALM_TEST_SEED"


def draw_seed(what: str) -> int:
    """The seed for `what`: $CALM_TEST_SEED when set, else a fresh one; printed either way."""
    given = os.environ.get(ENV, "").strip()
    seed = int(given) if given else secrets.randbits(31)
    print(f"{what}: seed {seed} ({'from $' + ENV if given else 'drawn'}; replay with {ENV}={seed})", flush=True)
    return seed
