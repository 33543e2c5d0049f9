"""Which route administers the tests' broker, and what the management-API route sends.

The management API runs in testcontainers' RabbitMQ, not on this machine (whose broker is administered
with rabbitmqctl): the requests are checked here as they leave the client; tests/integration/
test_rabbitmq_admin.py runs the chosen route against the real broker.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.support.rabbitmq_admin import ManagementApi, UseManagementApi, UseRabbitmqctl, choose_admin

LOCAL = "amqp://guest:guest@127.0.0.1:5672/"


def test_a_named_management_url_wins() -> None:
    assert choose_admin(LOCAL, "http://u:p@127.0.0.1:32771", rabbitmqctl_on_path=True) == UseManagementApi(
        "http://u:p@127.0.0.1:32771"
    )


@pytest.mark.parametrize("url", [LOCAL, "amqp://guest:guest@localhost/", "amqp://guest:guest@[::1]:5672/"])
def test_rabbitmqctl_for_the_broker_on_this_machine(url: str) -> None:
    assert choose_admin(url, None, rabbitmqctl_on_path=True) == UseRabbitmqctl()
    assert choose_admin(url, "", rabbitmqctl_on_path=True) == UseRabbitmqctl()


def test_without_rabbitmqctl_the_management_api_of_the_brokers_host_with_its_credentials() -> None:
    assert choose_admin("amqp://mlp:secret@127.0.0.1:5672/", None, rabbitmqctl_on_path=False) == UseManagementApi(
        "http://mlp:secret@127.0.0.1:15672"
    )


def test_a_remote_broker_is_never_given_to_the_local_rabbitmqctl() -> None:
    assert choose_admin("amqp://broker.internal:5672/", None, rabbitmqctl_on_path=True) == UseManagementApi(
        "http://guest:guest@broker.internal:15672"
    )


Sent = list[tuple[str, str, object, str]]


def _recording_api(status: int = 204) -> tuple[ManagementApi, Sent]:
    sent: Sent = []

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        sent.append((request.method, request.url.raw_path.decode(), body, request.headers["authorization"]))
        return httpx.Response(status)

    return ManagementApi("http://guest:guest@127.0.0.1:32771", transport=httpx.MockTransport(handle)), sent


BASIC_GUEST = "Basic " + "Z3Vlc3Q6Z3Vlc3Q="  # guest:guest, the image's default user


def test_each_operation_is_its_management_api_request() -> None:
    api, sent = _recording_api()
    api.add_vhost("mlp_t_1")
    api.set_permissions("mlp_t_1", "guest", ".*", ".*", ".*")
    api.add_user("ext-1", "pw")
    api.set_topic_permissions("mlp_t_1", "ext-1", "mlp.events", "^mlp\\.requested\\..*", "^$")
    api.set_policy("mlp_t_1", "ext-limit", "^mlp\\.", {"max-length": 10}, priority=5, apply_to="queues")
    api.delete_user("ext-1")
    api.delete_vhost("mlp_t_1")
    assert [(m, p, b) for m, p, b, _ in sent] == [
        ("PUT", "/api/vhosts/mlp_t_1", None),
        ("PUT", "/api/permissions/mlp_t_1/guest", {"configure": ".*", "write": ".*", "read": ".*"}),
        ("PUT", "/api/users/ext-1", {"password": "pw", "tags": ""}),
        (
            "PUT",
            "/api/topic-permissions/mlp_t_1/ext-1",
            {"exchange": "mlp.events", "write": "^mlp\\.requested\\..*", "read": "^$"},
        ),
        (
            "PUT",
            "/api/policies/mlp_t_1/ext-limit",
            {"pattern": "^mlp\\.", "definition": {"max-length": 10}, "priority": 5, "apply-to": "queues"},
        ),
        ("DELETE", "/api/users/ext-1", None),
        ("DELETE", "/api/vhosts/mlp_t_1", None),
    ]
    assert {auth for *_, auth in sent} == {BASIC_GUEST}


def test_the_default_vhost_is_one_quoted_path_segment() -> None:
    api, sent = _recording_api()
    api.set_permissions("/", "guest", ".*", ".*", ".*")
    assert sent[0][1] == "/api/permissions/%2F/guest"


def test_a_refused_request_raises() -> None:
    api, _ = _recording_api(status=401)
    with pytest.raises(httpx.HTTPStatusError):
        api.add_vhost("mlp_t_1")


def test_closing_named_connections_deletes_only_those_the_client_named_so() -> None:
    listed = [
        {"name": "10.0.0.5:41000 -> 10.0.0.2:5672", "client_properties": {"connection_name": "mlp-worker pod-a:7"}},
        {"name": "10.0.0.6:41001 -> 10.0.0.2:5672", "client_properties": {"connection_name": "mlp-collector pod-b:7"}},
        {"name": "10.0.0.7:41002 -> 10.0.0.2:5672", "client_properties": {}},
    ]
    sent: list[tuple[str, str, str | None]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        sent.append((request.method, request.url.raw_path.decode(), request.headers.get("x-reason")))
        return httpx.Response(200, json=listed) if request.method == "GET" else httpx.Response(204)

    api = ManagementApi("http://guest:guest@127.0.0.1:32771", transport=httpx.MockTransport(handle))
    assert api.close_connections_named("mlp-worker pod-a:7", "test") == 1
    assert sent == [
        ("GET", "/api/connections", None),
        ("DELETE", "/api/connections/10.0.0.5%3A41000%20-%3E%2010.0.0.2%3A5672", "test"),
    ]
