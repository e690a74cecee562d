"""The rank helper itself (tests/helpers/ranks.py): one deadline for the whole group, every rank killed on
the first failure or at the deadline, and every rank's output in the failure message."""
import os
import time

import pytest

from tests.helpers.ranks import launch_ranks, run_distributed_test

# Rank 1 fails once rank 0 has started (so both have output to show); rank 0 would wait a minute (as a
# rank blocked in a collective does). Without the wait, rank 0 could be killed before it printed a line.
FAIL_ONE = r"""
import os, sys, tempfile, time
rank = int(os.environ["RANK"])
started = os.path.join(tempfile.gettempdir(), f"fail_one_{os.environ['MASTER_PORT']}_rank0")
print(f"rank {rank} of {os.environ['WORLD_SIZE']} started, port {os.environ['MASTER_PORT']}", flush=True)
if rank == 1:
    for _ in range(200):
        if os.path.exists(started):
            break
        time.sleep(0.05)
    sys.exit("rank 1 gives up")
open(started, "w").close()
time.sleep(60)
"""


def test_the_first_failure_stops_every_rank_and_shows_all_outputs(tmp_path):
    t0 = time.monotonic()
    ranks = launch_ranks(2, ["-c", FAIL_ONE], tmp_path / "logs", module=None)
    with pytest.raises(AssertionError) as e:
        ranks.wait(50)
    assert time.monotonic() - t0 < 30  # not rank 0's 60 s sleep, nor the 50 s deadline
    msg = str(e.value)
    assert msg.startswith("rank 1 exited with 1 (expected 0)")
    assert "rank 0 of 2 started" in msg and "rank 1 of 2 started" in msg and "rank 1 gives up" in msg
    codes = ranks.codes()
    assert codes[1] == 1 and codes[0] is not None and codes[0] < 0  # rank 0 killed, not left running


def test_one_deadline_for_the_group(tmp_path):
    # Rank 0 takes 3 s and rank 1 8 s: each within a per-process timeout of 6 s waited one after the other
    # (3 + 6 > 8), but not within one deadline of 6 s for the group. Rank 0 has 3 s of slack to start.
    code = "import os, time; time.sleep((3, 8)[int(os.environ['RANK'])]); print('done', flush=True)"
    ranks = launch_ranks(2, ["-c", code], tmp_path / "logs", module=None)
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match=r"ranks still running after 6 s \(hang\?\): \[1\]; all killed"):
        ranks.wait(6)
    assert time.monotonic() - t0 < 20
    assert ranks.output(0) == "done\n" and ranks.codes()[1] < 0


def test_expected_codes_and_per_rank_arguments(tmp_path):
    code = "import sys; print(sys.argv[1]); sys.exit(int(sys.argv[1]))"
    assert launch_ranks(3, lambda r: ["-c", code, "3"], tmp_path / "a", module=None).wait(60, expect=3) == [3] * 3
    ranks = launch_ranks(2, lambda r: ["-c", code, str(r)], tmp_path / "b", module=None)
    assert ranks.wait(60, expect=None) == [0, 1]
    assert [ranks.output(r) for r in range(2)] == ["0\n", "1\n"]


def _fails_on_rank_1(rank, world_size, message, started):
    # As FAIL_ONE: rank 1 fails only once rank 0 has printed, so both outputs exist to be shown.
    print(f"function rank {rank}/{world_size}", flush=True)
    if rank == 1:
        for _ in range(400):
            if os.path.exists(started):
                break
            time.sleep(0.05)
        raise ValueError(message)
    open(started, "w").close()
    time.sleep(60)


def test_run_distributed_test_reports_the_failing_rank_with_every_output(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(AssertionError) as e:
        run_distributed_test(_fails_on_rank_1, 2, "no such thing", str(tmp_path / "rank0_started"),
                             timeout=50, log_dir=tmp_path)
    assert time.monotonic() - t0 < 40
    msg = str(e.value)
    assert msg.startswith("rank 1 exited with 1 (expected 0)")
    assert "function rank 0/2" in msg and "function rank 1/2" in msg
    assert "ValueError: no such thing" in msg and "Traceback" in msg
