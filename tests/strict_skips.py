"""A pytest plugin: with ``LIPKIT_STRICT_SKIPS=1`` a test skipped for a reason that names neither CUDA nor a GPU
fails the run. CI sets it, since every asset is installed there, so a missing asset cannot silently turn tests off.
"""

from __future__ import annotations

import os
import re

import pytest

STRICT_SKIPS = "LIPKIT_STRICT_SKIPS"
ALLOWED_SKIP = re.compile(r"\b(cuda|gpu)\b", re.IGNORECASE)


class StrictSkips:
    """Collects skips whose reason names neither CUDA nor a GPU, lists them and fails the session."""

    def __init__(self) -> None:
        self.unexpected: list[str] = []

    def _note(self, report: pytest.CollectReport | pytest.TestReport) -> None:
        if not report.skipped or hasattr(report, "wasxfail"):  # an expected failure is no skip
            return
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not ALLOWED_SKIP.search(reason):
            self.unexpected.append(f"{report.nodeid}: {reason}")

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._note(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._note(report)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.unexpected and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.unexpected:
            terminalreporter.section(f"{STRICT_SKIPS}=1: only tests that need CUDA may skip", red=True)
            for line in self.unexpected:
                terminalreporter.line(line, red=True)


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get(STRICT_SKIPS) == "1":
        config.pluginmanager.register(StrictSkips(), "lipkit-strict-skips")
