"""Shared fixtures: an isolated namespace on the real services, and Settings pointing at it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from ml_service.launcher import TritonProcess
from mlp.settings import Settings
from tests.support.isolation import Namespace, isolated_namespace
from tests.support.provision import stop_started_containers

# One real Triton per test session (free ports), shared by every test that needs one.
pytest_plugins = ["tests.support.triton"]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish() -> None:
    """Stop the containers that tests.support.provision started for this session, if any."""
    stop_started_containers()


@pytest.fixture(scope="session")
def namespace() -> Iterator[Namespace]:
    with isolated_namespace("t") as ns:
        yield ns


@pytest.fixture(scope="session")
def settings(namespace: Namespace) -> Settings:
    return _settings_for(namespace)


def _settings_for(ns: Namespace) -> Settings:
    return Settings(
        environment="test",
        rabbitmq_url=ns.rabbitmq_url,
        postgres_dsn=ns.postgres_dsn,
        redis_url=ns.redis_url,
        redis_prefix=ns.redis_prefix,
    )


@pytest.fixture(scope="module")
async def module_settings() -> AsyncIterator[Settings]:
    """A namespace (vhost, database, Redis prefix) of the test module's own, migrated: for modules that
    assert on what a shared queue holds, which other modules' leftovers would disturb."""
    from projections.migrate import migrate

    with isolated_namespace("m") as ns:
        settings = _settings_for(ns)
        await migrate(settings.postgres_dsn)
        yield settings


@pytest.fixture(scope="session")
async def migrated(settings: Settings) -> Settings:
    from projections.migrate import migrate

    await migrate(settings.postgres_dsn)
    return settings


@pytest.fixture(scope="session")
def triton_grpc_url(triton_server: TritonProcess) -> str:
    return triton_server.grpc_url
