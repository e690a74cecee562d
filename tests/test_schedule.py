import math

import pytest

from calm_pretrain.train.schedule import lr_at


def test_warmup_is_honoured_for_constant_and_cosine():
    for decay in ("constant", "cosine"):
        lrs = [lr_at(s, lr=1.0, warmup_steps=4, max_steps=12, decay=decay) for s in range(12)]
        assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(100, lr=1.0, warmup_steps=4, max_steps=12, decay="constant") == 1.0


def test_cosine_reaches_min_lr_at_the_end():
    f = lambda s: lr_at(s, lr=1.0, warmup_steps=2, max_steps=10, decay="cosine", min_lr=0.1)  # noqa: E731
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert f(10) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(2, 12))


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="lr_decay"):
        lr_at(5, lr=1.0, warmup_steps=0, max_steps=10, decay="linear")
