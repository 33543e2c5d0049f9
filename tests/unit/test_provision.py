"""Where the tests' services come from (tests.support.provision): the pure decision, every branch."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.support.provision import (
    MODE_VARIABLE,
    SERVICES,
    SERVICES_BY_NAME,
    Host,
    Mode,
    ServiceName,
    ServiceProbe,
    Unavailable,
    choose_sources,
    docker_needed,
    parse_mode,
    service_url,
    unavailable_report,
)

DOCKER = Host(docker_answers=True, testcontainers_installed=True)
NO_DOCKER = Host(docker_answers=False, testcontainers_installed=True)
DOCKER_NO_LIBRARY = Host(docker_answers=True, testcontainers_installed=False)


def probe(name: ServiceName, answers: bool, from_env: bool = False) -> ServiceProbe:
    service = SERVICES_BY_NAME[name]
    url = f"{service.default_url}#custom" if from_env else service.default_url
    return ServiceProbe(service, url, url_from_environment=from_env, answers=answers)


def all_probes(answers: bool, from_env: bool = False) -> list[ServiceProbe]:
    return [probe(s.name, answers, from_env) for s in SERVICES]


def reason(choice: object) -> str:
    assert isinstance(choice, Unavailable), choice
    return choice.reason


# --- this machine and CI: everything answers at the defaults --------------------------------------


@pytest.mark.parametrize("mode", ["auto", "environment"])
def test_services_that_answer_are_used_and_docker_is_not_asked(mode: Mode) -> None:
    probes = all_probes(answers=True)
    assert docker_needed(probes, mode) is False
    assert choose_sources(probes, mode, None) == {
        "rabbitmq": "environment",
        "postgres": "environment",
        "redis": "environment",
    }


def test_a_named_url_that_answers_is_used() -> None:
    probes = all_probes(answers=True, from_env=True)
    assert docker_needed(probes, "auto") is False
    assert set(choose_sources(probes, "auto", None).values()) == {"environment"}


# --- a laptop with Docker and none of the services -------------------------------------------------


def test_missing_services_are_started_with_testcontainers_where_docker_answers() -> None:
    probes = all_probes(answers=False)
    assert docker_needed(probes, "auto") is True
    assert set(choose_sources(probes, "auto", DOCKER).values()) == {"testcontainers"}


def test_only_the_missing_service_is_started() -> None:
    probes = [probe("rabbitmq", True), probe("postgres", False), probe("redis", True)]
    assert choose_sources(probes, "auto", DOCKER) == {
        "rabbitmq": "environment",
        "postgres": "testcontainers",
        "redis": "environment",
    }


# --- the errors name the service and the fix ---------------------------------------------------------


def test_no_service_and_no_docker_names_each_service_its_url_and_both_fixes() -> None:
    choices = choose_sources(all_probes(answers=False), "auto", NO_DOCKER)
    for service in SERVICES:
        text = reason(choices[service.name])
        assert text.startswith(f"{service.label} does not answer at {service.default_url} (the default)")
        assert "no Docker engine answers" in text
        assert "scripts/ensure-services" in text
        assert "Docker engine for testcontainers" in text
    report = unavailable_report(choices)
    assert report is not None
    assert [line.split(" does not")[0] for line in report.splitlines()[1:]] == [
        "  - RabbitMQ",
        "  - PostgreSQL",
        "  - Redis",
    ]


def test_docker_without_testcontainers_says_to_install_the_dev_extra() -> None:
    text = reason(choose_sources([probe("redis", False)], "auto", DOCKER_NO_LIBRARY)["redis"])
    assert "Redis does not answer" in text
    assert "testcontainers is not installed" in text
    assert "pip install -e '.[dev]'" in text


def test_a_named_url_that_does_not_answer_is_an_error_not_a_container() -> None:
    # Someone chose that URL: starting a container instead would test something else.
    choice = choose_sources([probe("postgres", False, from_env=True)], "auto", DOCKER)["postgres"]
    text = reason(choice)
    assert text.startswith("PostgreSQL does not answer at MLP_TEST_POSTGRES_DSN=postgresql://")
    assert "unset MLP_TEST_POSTGRES_DSN" in text
    assert docker_needed([probe("postgres", False, from_env=True)], "auto") is False


def test_environment_mode_never_starts_a_container() -> None:
    probes = [probe("rabbitmq", False), probe("postgres", True), probe("redis", True)]
    assert docker_needed(probes, "environment") is False
    choices = choose_sources(probes, "environment", None)
    assert choices["postgres"] == choices["redis"] == "environment"
    text = reason(choices["rabbitmq"])
    assert text.startswith("RabbitMQ does not answer at amqp://guest:guest@127.0.0.1:5672/ (the default)")
    assert f"{MODE_VARIABLE}=environment" in text
    assert "scripts/ensure-services" in text


# --- testcontainers mode: containers even where the local services answer ----------------------------


def test_testcontainers_mode_starts_all_three_even_where_the_services_answer() -> None:
    probes = all_probes(answers=True)
    assert docker_needed(probes, "testcontainers") is True
    assert set(choose_sources(probes, "testcontainers", DOCKER).values()) == {"testcontainers"}


def test_testcontainers_mode_without_docker_is_an_error() -> None:
    text = reason(choose_sources([probe("redis", True)], "testcontainers", NO_DOCKER)["redis"])
    assert "no Docker engine answers" in text


def test_testcontainers_mode_with_a_named_url_asks_to_choose() -> None:
    text = reason(choose_sources([probe("redis", True, from_env=True)], "testcontainers", DOCKER)["redis"])
    assert text.startswith(f"Redis: {MODE_VARIABLE}=testcontainers but MLP_TEST_REDIS_URL=")
    assert "unset MLP_TEST_REDIS_URL" in text


def test_a_decision_that_needs_docker_refuses_to_guess_without_the_probe() -> None:
    with pytest.raises(AssertionError, match="Docker engine probe"):
        choose_sources([probe("redis", False)], "auto", None)


# --- inputs ------------------------------------------------------------------------------------------


def test_no_report_when_every_service_is_available() -> None:
    assert unavailable_report({"rabbitmq": "environment", "postgres": "testcontainers"}) is None


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        (None, "auto"),
        ("", "auto"),
        ("auto", "auto"),
        (" Environment ", "environment"),
        ("testcontainers", "testcontainers"),
    ],
)
def test_mode_parsing(value: str | None, mode: Mode) -> None:
    assert parse_mode(value) == mode


def test_an_unknown_mode_names_the_variable_and_the_choices() -> None:
    with pytest.raises(
        ValueError, match=r"MLP_TEST_SERVICES='docker': expected one of auto, environment, testcontainers"
    ):
        parse_mode("docker")


def test_service_url_is_the_variable_or_the_local_default() -> None:
    assert service_url("redis", {}) == "redis://127.0.0.1:6379/0"
    assert service_url("redis", {"MLP_TEST_REDIS_URL": ""}) == "redis://127.0.0.1:6379/0"
    assert service_url("redis", {"MLP_TEST_REDIS_URL": "redis://cache:6380/2"}) == "redis://cache:6380/2"
    assert service_url("postgres", {}) == "postgresql://postgres@127.0.0.1:5432/postgres"
    assert service_url("rabbitmq", {}) == "amqp://guest:guest@127.0.0.1:5672/"


def test_images_are_pinned_postgres_15_and_rabbitmq_redis_as_in_compose() -> None:
    for service in SERVICES:
        tag = service.image.partition(":")[2]
        assert tag[:1].isdigit(), service.image  # a version, never "latest"
    assert SERVICES_BY_NAME["postgres"].image.startswith("postgres:15.")
    compose = yaml.safe_load((Path(__file__).resolve().parents[2] / "compose.yaml").read_text(encoding="utf-8"))
    assert SERVICES_BY_NAME["redis"].image == compose["services"]["redis"]["image"]
    assert SERVICES_BY_NAME["rabbitmq"].image == compose["services"]["rabbitmq"]["image"]
    assert SERVICES_BY_NAME["rabbitmq"].image.endswith("-management")  # the vhosts go through its HTTP API
