"""RabbitMQ users of a test run, made from the committed definitions files (examples/rabbitmq/).

Each test user gets exactly one definitions user's permissions, topic permissions and the file's
policies in the run's vhost (``broker_admin()``: rabbitmqctl here, the HTTP API in a container), under
a fresh name and password; it is deleted afterwards, also on failure.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tests.support.isolation import broker_admin

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "rabbitmq"


def load_definitions(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((EXAMPLES / name).read_text(encoding="utf-8"))
    return loaded


@dataclass(frozen=True)
class BrokerUser:
    name: str
    url: str


def apply_definitions(definitions: dict[str, Any], template_user: str, user: str, vhost: str) -> None:
    """``template_user``'s permissions and topic permissions, and the file's policies, for ``user`` in ``vhost``.

    The template's name inside a pattern (the external user's own queue prefix) becomes ``user``.
    """

    def named(regex: str) -> str:
        return regex.replace(template_user, user)

    admin = broker_admin()
    for p in definitions["permissions"]:
        if p["user"] == template_user:
            admin.set_permissions(vhost, user, named(p["configure"]), named(p["write"]), named(p["read"]))
    for t in definitions["topic_permissions"]:
        if t["user"] == template_user:
            admin.set_topic_permissions(vhost, user, t["exchange"], named(t["write"]), named(t["read"]))
    for policy in definitions.get("policies", []):
        admin.set_policy(
            vhost,
            policy["name"],
            policy["pattern"],
            policy["definition"],
            priority=int(policy["priority"]),
            apply_to=policy["apply-to"],
        )


@contextmanager
def user_like(definitions: dict[str, Any], template_user: str, vhost_url: str, label: str) -> Iterator[BrokerUser]:
    """A user with ``template_user``'s rights in the vhost of ``vhost_url``; yields its AMQP URL."""
    assert template_user in {u["name"] for u in definitions["users"]}, template_user
    name = f"{label}-{uuid.uuid4().hex[:8]}"
    password = secrets.token_hex(18)  # hex: never starts with "-" (rabbitmqctl would read an option)
    parts = urlsplit(vhost_url)
    vhost = parts.path[1:] or "/"
    broker_admin().add_user(name, password)
    try:
        apply_definitions(definitions, template_user, name, vhost)
        netloc = f"{name}:{password}@{parts.hostname}:{parts.port or 5672}"
        yield BrokerUser(name=name, url=urlunsplit(parts._replace(netloc=netloc)))
    finally:
        broker_admin().delete_user(name)
