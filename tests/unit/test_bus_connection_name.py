"""Each service names its broker connection, so an operator can tell them apart in RabbitMQ."""

from __future__ import annotations

import os
import socket
from urllib.parse import parse_qs, urlsplit

from mlp.bus import connection_name, make_broker
from mlp.settings import Settings


def _broker_url(rabbitmq_url: str, app_id: str) -> str:
    broker = make_broker(Settings(rabbitmq_url=rabbitmq_url), app_id=app_id)
    url: str = broker._connection_kwargs["url"]
    return url


def test_the_name_says_which_service_on_which_host_in_which_process() -> None:
    assert connection_name("mlp-worker") == f"mlp-worker {socket.gethostname()}:{os.getpid()}"


def test_the_broker_url_carries_the_name_and_keeps_the_rest() -> None:
    url = _broker_url("amqp://svc:secret@rabbit.example:5671/mlp?heartbeat=30", "mlp-collector")
    parts = urlsplit(url)
    assert (parts.hostname, parts.port, parts.path, parts.username) == ("rabbit.example", 5671, "/mlp", "svc")
    query = parse_qs(parts.query)
    assert query["heartbeat"] == ["30"]
    assert query["name"] == [connection_name("mlp-collector")]


def test_a_name_given_in_the_url_is_kept() -> None:
    url = _broker_url("amqp://guest:guest@127.0.0.1:5672/?name=chosen-by-the-operator", "mlp-worker")
    assert parse_qs(urlsplit(url).query)["name"] == ["chosen-by-the-operator"]
