"""Suite-wide rules: a run with skipped tests is not a green run."""

from __future__ import annotations

import pytest

from tests.prereq import IN_CI


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Outside CI a missing prerequisite skips its tests (under CI=true it fails them);
    either way the run must not end as if everything passed."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if skipped and exitstatus == pytest.ExitCode.OK and not IN_CI:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = len(terminalreporter.stats.get("skipped", []))
    if skipped:
        terminalreporter.write_line(
            f"{skipped} tests skipped for a missing prerequisite (see the reasons above): "
            "this run is not green; scripts/setup installs what they need", red=True)
