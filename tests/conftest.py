import os
from pathlib import Path

# Tests never touch the network and stay on the CPU threads they are given.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import REPO, SHARED_DATA  # noqa: E402,F401
# Any skip not allowed there fails the run (the allow-list: a `gpu` test without CUDA, a shared-data
# test without ../shared/data).
from tests.helpers.skip_policy import NO_CUDA, NO_SHARED_DATA, install as install_skip_policy  # noqa: E402


def pytest_configure(config):
    install_skip_policy(config)  # markers gpu and slow: pytest.ini


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NO_CUDA)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_rank_left_running():
    """A test that fails (or times out) before waiting for its ranks leaves none behind."""
    yield
    from tests.helpers.ranks import kill_leftovers

    kill_leftovers()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(NO_SHARED_DATA)
    return SHARED_DATA


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """Tiny training shards for the multi-process trainer tests: latents (K=4, d=16, 8 chunks) and
    tokens (32 per sample), 96 samples each, vocabulary 64."""
    import numpy as np

    from tests.helpers.data import write_latent_dataset, write_token_dataset

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    n, chunks, k, d = 96, 8, 4, 16
    write_latent_dataset(root / "latents", rng.integers(3, 64, (n, chunks * k)),
                         rng.standard_normal((n, chunks, d)).astype(np.float32),
                         np.full((n, chunks, d), -2.0, np.float32), k=k)
    write_token_dataset(root / "tokens", rng.integers(3, 64, (n, 32)), k=1)
    return root
