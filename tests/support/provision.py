"""Where the tests' RabbitMQ, PostgreSQL and Redis come from: the environment, or testcontainers.

On the shared machines and in CI the services run on the machine (``scripts/ensure-services``) and
the tests use them at ``MLP_TEST_RABBITMQ_URL`` / ``MLP_TEST_POSTGRES_DSN`` / ``MLP_TEST_REDIS_URL``
(defaults: 127.0.0.1). On a laptop with a Docker engine and none of these services, the tests start
each missing one with testcontainers from a pinned image and export its URL, so that
``tests.support.isolation`` (which reads the variables when a namespace is made) finds it.

``choose_sources`` decides, purely, from what was probed; ``ensure_services()`` probes, starts what
the decision says, and exports the URLs, once per process. ``MLP_TEST_SERVICES`` overrides the choice:
``auto`` (the default), ``environment`` (never start a container: CI) or ``testcontainers`` (start all
three, whatever answers locally). Triton is not here: the tests run the bundled ``tritonserver``.

Imports of testcontainers are lazy: nothing here needs Docker or testcontainers on the machines that
have the services.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import pytest

from tests.support.rabbitmq_admin import MANAGEMENT_PORT, MANAGEMENT_URL_VARIABLE

ServiceName = Literal["rabbitmq", "postgres", "redis"]
Mode = Literal["auto", "environment", "testcontainers"]
MODE_VARIABLE = "MLP_TEST_SERVICES"
MODES: tuple[Mode, ...] = ("auto", "environment", "testcontainers")
INSTALL_FIX = "install the dev extra (pip install -e '.[dev]', or make test) for testcontainers"
START_FIX = "start it (scripts/ensure-services, or docker compose up -d) or a Docker engine for testcontainers"


@dataclass(frozen=True)
class Service:
    name: ServiceName
    label: str
    variable: str
    default_url: str
    image: str  # pinned: Postgres 15 as Debian bookworm's (the machines'), RabbitMQ and Redis as compose.yaml's


SERVICES: tuple[Service, ...] = (
    Service(
        "rabbitmq",
        "RabbitMQ",
        "MLP_TEST_RABBITMQ_URL",
        "amqp://guest:guest@127.0.0.1:5672/",
        "rabbitmq:3.13.7-management",
    ),
    Service(
        "postgres",
        "PostgreSQL",
        "MLP_TEST_POSTGRES_DSN",
        "postgresql://postgres@127.0.0.1:5432/postgres",
        "postgres:15.10-bookworm",
    ),
    Service("redis", "Redis", "MLP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0", "redis:7.4.1-bookworm"),
)
SERVICES_BY_NAME: dict[ServiceName, Service] = {s.name: s for s in SERVICES}


def service_url(name: ServiceName, environ: Mapping[str, str] | None = None) -> str:
    """The URL the tests use for ``name`` now: the variable's value, or the local default."""
    service = SERVICES_BY_NAME[name]
    return (os.environ if environ is None else environ).get(service.variable) or service.default_url


# --- the decision (pure) -------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceProbe:
    service: Service
    url: str
    url_from_environment: bool  # its variable is set (someone named this service), not the default
    answers: bool


@dataclass(frozen=True)
class Host:
    docker_answers: bool
    testcontainers_installed: bool


@dataclass(frozen=True)
class Unavailable:
    service: Service
    reason: str  # names the service, its URL or variable, and the fix


Source = Literal["environment", "testcontainers"]
Choice = Source | Unavailable


def parse_mode(value: str | None) -> Mode:
    mode = (value or "auto").strip().lower()
    for known in MODES:
        if mode == known:
            return known
    raise ValueError(f"{MODE_VARIABLE}={value!r}: expected one of {', '.join(MODES)}")


def docker_needed(probes: Sequence[ServiceProbe], mode: Mode) -> bool:
    """Whether the decision depends on a Docker engine (so probing for one can be skipped when not)."""
    if mode == "environment":
        return False
    if mode == "testcontainers":
        return True
    return any(not p.answers and not p.url_from_environment for p in probes)


def choose_sources(probes: Sequence[ServiceProbe], mode: Mode, host: Host | None) -> dict[ServiceName, Choice]:
    """Per service: use what answers at its URL, or start it with testcontainers, or say why neither.

    A variable that is set always means that service (a URL someone chose is never replaced by a
    container), so it must answer. ``host`` may be None only where ``docker_needed`` said so.
    """
    return {p.service.name: _choose(p, mode, host) for p in probes}


def _choose(probe: ServiceProbe, mode: Mode, host: Host | None) -> Choice:
    service = probe.service
    named = f"{service.variable}={probe.url}" if probe.url_from_environment else f"{probe.url} (the default)"
    if mode == "testcontainers" and probe.url_from_environment:
        return Unavailable(
            service,
            f"{service.label}: {MODE_VARIABLE}=testcontainers but {named} is set; unset {service.variable} "
            "to let testcontainers start it, or drop the override",
        )
    if mode != "testcontainers" and probe.answers:
        return "environment"
    if probe.url_from_environment:
        return Unavailable(
            service,
            f"{service.label} does not answer at {named}: start it there, or unset {service.variable} "
            "to use the local default or testcontainers",
        )
    if mode == "environment":
        return Unavailable(
            service,
            f"{service.label} does not answer at {named} and {MODE_VARIABLE}=environment: start it "
            "(scripts/ensure-services, or docker compose up -d)",
        )
    assert host is not None, "a Docker engine probe is needed for this decision"
    if not host.docker_answers:
        return Unavailable(
            service, f"{service.label} does not answer at {named} and no Docker engine answers: {START_FIX}"
        )
    if not host.testcontainers_installed:
        return Unavailable(
            service,
            f"{service.label} does not answer at {named}; a Docker engine answers but testcontainers "
            f"is not installed: {INSTALL_FIX}",
        )
    return "testcontainers"


def unavailable_report(choices: Mapping[ServiceName, Choice]) -> str | None:
    """One message for every service that cannot be had, or None when all can."""
    reasons = [c.reason for c in choices.values() if isinstance(c, Unavailable)]
    if not reasons:
        return None
    return "the tests' services are not available:\n" + "\n".join(f"  - {r}" for r in reasons)


# --- the adapter (probes, containers, environment) -----------------------------------------------


def url_answers(url: str, timeout_s: float = 1.0) -> bool:
    """Something accepts TCP connections at the URL's host and port."""
    parts = urlsplit(url)
    default_ports = {"amqp": 5672, "postgresql": 5432, "postgres": 5432, "redis": 6379}
    port = parts.port or default_ports.get(parts.scheme, 0)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def probe_services(environ: Mapping[str, str]) -> list[ServiceProbe]:
    probes = []
    for service in SERVICES:
        url = service_url(service.name, environ)
        probes.append(ServiceProbe(service, url, bool(environ.get(service.variable)), url_answers(url)))
    return probes


def testcontainers_installed() -> bool:
    return importlib.util.find_spec("testcontainers") is not None


def docker_engine_answers() -> bool:
    """A Docker engine answers where testcontainers would look (DOCKER_HOST, its properties, the context)."""
    if testcontainers_installed():
        try:
            from testcontainers.core.docker_client import DockerClient

            return bool(DockerClient().client.ping())
        except Exception:
            return False
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:  # `docker version` also answers without an engine; `docker info` asks the engine
        info = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return info.returncode == 0 and bool(info.stdout.strip())


@dataclass
class Started:
    """The containers this process started, stopped at the end of the session (Ryuk reaps them if it dies)."""

    containers: list[Any]

    def stop(self) -> None:
        while self.containers:
            with contextlib.suppress(Exception):
                self.containers.pop().stop()


_started = Started([])
_outcome: str | None = None  # the error message, once decided; "" when the services are available
atexit.register(_started.stop)


def _start(service: Service) -> dict[str, str]:
    """Start ``service``'s container; the variables that point the tests at it."""
    if service.name == "postgres":
        from testcontainers.community.postgres import PostgresContainer

        # Trust for every connection, as on the machines: the tests connect as postgres without a password.
        pg = PostgresContainer(service.image, username="postgres", dbname="postgres", driver=None)
        pg.with_env("POSTGRES_HOST_AUTH_METHOD", "trust")
        _started.containers.append(pg.start())
        host, port = pg.get_container_host_ip(), pg.get_exposed_port(5432)
        return {service.variable: f"postgresql://postgres@{host}:{port}/postgres"}
    if service.name == "redis":
        from testcontainers.community.redis import RedisContainer

        redis = RedisContainer(service.image)
        _started.containers.append(redis.start())
        host, port = redis.get_container_host_ip(), redis.get_exposed_port(6379)
        return {service.variable: f"redis://{host}:{port}/0"}
    from testcontainers.community.rabbitmq import RabbitMqContainer

    # The image lets guest connect from outside the container; the vhosts are made over the management API.
    rabbit = RabbitMqContainer(service.image, username="guest", password="guest")
    rabbit.with_exposed_ports(MANAGEMENT_PORT)
    _started.containers.append(rabbit.start())
    host = rabbit.get_container_host_ip()
    amqp_port, http_port = rabbit.get_exposed_port(5672), rabbit.get_exposed_port(MANAGEMENT_PORT)
    management_url = f"http://guest:guest@{host}:{http_port}"
    _wait_for_management_api(management_url)
    return {service.variable: f"amqp://guest:guest@{host}:{amqp_port}/", MANAGEMENT_URL_VARIABLE: management_url}


def _wait_for_management_api(url: str, timeout_s: float = 120.0) -> None:
    # The plugin starts after the AMQP listener the container's readiness probe waited for.
    parts = urlsplit(url)
    base, auth = f"http://{parts.hostname}:{parts.port}", (parts.username or "guest", parts.password or "guest")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/api/overview", auth=auth, timeout=2.0).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"RabbitMQ's management API did not answer at {base} within {timeout_s:.0f}s")


def ensure_services() -> None:
    """Make the tests' three services available (once per process); fail naming each that cannot be.

    Exports the started containers' URLs into ``os.environ``: service processes spawned later inherit them.
    """
    global _outcome
    if _outcome is None:
        _outcome = _provision() or ""
    if _outcome:
        pytest.fail(_outcome, pytrace=False)


def _provision() -> str | None:
    try:
        mode = parse_mode(os.environ.get(MODE_VARIABLE))
    except ValueError as exc:
        return str(exc)
    probes = probe_services(os.environ)
    host = Host(docker_engine_answers(), testcontainers_installed()) if docker_needed(probes, mode) else None
    choices = choose_sources(probes, mode, host)
    report = unavailable_report(choices)
    if report is not None:
        return report
    for name, choice in choices.items():
        if choice == "testcontainers":
            service = SERVICES_BY_NAME[name]
            print(f"provision: starting {service.label} ({service.image}) with testcontainers")
            try:
                os.environ.update(_start(service))
            except Exception as exc:
                return f"{service.label}: testcontainers could not start {service.image}: {exc}"
    return None


def stop_started_containers() -> None:
    """The end of the session (tests/conftest.py); atexit too, and Ryuk if the process is killed."""
    _started.stop()
