"""tests.support.provision's probes and its outcome on this machine, whose services run locally.

Nothing here starts a container: the cases that would (a laptop with Docker) are the pure decision's,
in tests/unit/test_provision.py.
"""

from __future__ import annotations

import pytest

from tests.support import provision
from tests.support.provision import SERVICES, probe_services, url_answers
from tests.support.services import free_port

pytestmark = pytest.mark.integration


def test_the_machines_services_answer_at_their_urls_and_a_free_port_does_not() -> None:
    probes = probe_services({})
    assert [(p.service.name, p.url_from_environment, p.answers) for p in probes] == [
        (s.name, False, True) for s in SERVICES
    ]
    assert url_answers(f"redis://127.0.0.1:{free_port()}/0") is False


def test_the_services_come_from_the_environment_here(monkeypatch: pytest.MonkeyPatch) -> None:
    for service in SERVICES:
        monkeypatch.delenv(service.variable, raising=False)
    monkeypatch.delenv(provision.MODE_VARIABLE, raising=False)
    assert provision._provision() is None
    assert provision._started.containers == []


def test_a_named_url_where_nothing_answers_fails_naming_the_service_and_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    monkeypatch.setenv("MLP_TEST_REDIS_URL", url)
    monkeypatch.setenv(provision.MODE_VARIABLE, "auto")
    message = provision._provision()
    assert message is not None
    assert f"Redis does not answer at MLP_TEST_REDIS_URL={url}" in message
    assert "RabbitMQ" not in message
    assert "PostgreSQL" not in message
    assert provision._started.containers == []


def test_an_unknown_mode_fails_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(provision.MODE_VARIABLE, "docker")
    assert provision._provision() == ("MLP_TEST_SERVICES='docker': expected one of auto, environment, testcontainers")
