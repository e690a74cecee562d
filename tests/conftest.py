import os
from pathlib import Path

# Tests never touch the network and stay on the CPU threads they are given.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "slow: longer CPU test (still part of CI)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """Tiny training shards for the multi-process trainer tests: latents (K=4, d=16, 8 chunks) and
    tokens (32 per sample), 96 samples each, vocabulary 64."""
    import numpy as np

    from data_pipeline.testing import write_latent_dataset, write_token_dataset

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    n, chunks, k, d = 96, 8, 4, 16
    write_latent_dataset(root / "latents", rng.integers(3, 64, (n, chunks * k)),
                         rng.standard_normal((n, chunks, d)).astype(np.float32),
                         np.full((n, chunks, d), -2.0, np.float32), k=k)
    write_token_dataset(root / "tokens", rng.integers(3, 64, (n, 32)), k=1)
    return root
