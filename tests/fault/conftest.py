"""Fault-suite fixtures: the fault table (printed at the end of the session) and service safety nets."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.faults import FAULT_TABLE_KEY, FaultTable, ensure_services


@pytest.fixture(scope="session")
def fault_table(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> FaultTable:
    table = FaultTable(tmp_path_factory.getbasetemp() / "fault-table.json")
    request.config.stash[FAULT_TABLE_KEY] = table
    return table


@pytest.fixture(autouse=True)
def machine_services_up() -> Iterator[None]:
    """Every fault test starts and ends with PostgreSQL, Redis and RabbitMQ up, whatever happened."""
    ensure_services()
    yield
    ensure_services()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    table = config.stash.get(FAULT_TABLE_KEY, None)
    if table is None or not table.rows:
        return
    terminalreporter.write_sep("=", f"fault table ({table.path})")
    terminalreporter.write_line(table.render())
