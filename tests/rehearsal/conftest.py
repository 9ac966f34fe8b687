"""The rehearsal's report (``tests/rehearsal/report.py``): started empty, printed at the end of the session."""

from __future__ import annotations

import pytest

from tests.rehearsal.report import REPORT, read_report, table


@pytest.fixture(scope="session", autouse=True)
def fresh_report():
    """Each session's report starts empty (a sub-folder conftest sees no ``pytest_sessionstart``)."""
    REPORT.unlink(missing_ok=True)
    yield


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter) -> None:
    rows = read_report()
    if rows:
        terminalreporter.section("rehearsal: one line per scenario")
        terminalreporter.write_line(table(rows))
        terminalreporter.write_line(f"(also in {REPORT})")
