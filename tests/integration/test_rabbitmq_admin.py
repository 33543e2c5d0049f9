"""The broker admin that the tests use (tests.support.isolation.broker_admin) against the real RabbitMQ.

rabbitmqctl on this machine; the management API where MLP_TEST_RABBITMQ_MANAGEMENT_URL names one
(testcontainers' RabbitMQ): the same assertions hold for both.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq.exceptions
import pytest

from tests.support.isolation import base_rabbitmq_url, broker_admin
from tests.support.provision import ensure_services

pytestmark = pytest.mark.integration


def _url(user: str, password: str, vhost: str) -> str:
    parts = urlsplit(base_rabbitmq_url())
    return urlunsplit(
        parts._replace(netloc=f"{user}:{password}@{parts.hostname}:{parts.port or 5672}", path="/" + vhost)
    )


@pytest.fixture
def vhost() -> Iterator[str]:
    ensure_services()
    name = f"mlp_admin_{uuid.uuid4().hex[:10]}"
    broker_admin().add_vhost(name)
    try:
        yield name
    finally:
        broker_admin().delete_vhost(name)


async def test_a_user_with_permissions_in_a_new_vhost_can_use_it_and_policies_apply(vhost: str) -> None:
    admin = broker_admin()
    user, password = f"admin-test-{uuid.uuid4().hex[:8]}", secrets.token_hex(12)
    admin.add_user(user, password)
    try:
        admin.set_permissions(vhost, user, ".*", ".*", ".*")
        admin.set_policy(vhost, "cap", "^capped\\.", {"max-length": 1}, priority=1, apply_to="queues")
        connection = await aio_pika.connect(_url(user, password, vhost))
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue("capped.q", durable=True)
            for body in (b"first", b"second"):
                await channel.default_exchange.publish(aio_pika.Message(body), routing_key="capped.q")
            await channel.close()
            channel = await connection.channel()
            queue = await channel.declare_queue("capped.q", passive=True)
            assert queue.declaration_result.message_count == 1  # max-length 1: the policy is in force
            message = await queue.get(no_ack=True)
            assert message.body == b"second"  # the default overflow drops from the head
    finally:
        admin.delete_user(user)
    with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
        await aio_pika.connect(_url(user, password, vhost))


async def test_a_deleted_vhost_refuses_connections() -> None:
    ensure_services()
    name = f"mlp_admin_{uuid.uuid4().hex[:10]}"
    admin = broker_admin()
    user = urlsplit(base_rabbitmq_url()).username or "guest"
    password = urlsplit(base_rabbitmq_url()).password or "guest"
    admin.add_vhost(name)
    admin.set_permissions(name, user, ".*", ".*", ".*")
    connection = await aio_pika.connect(_url(user, password, name))
    await connection.close()
    admin.delete_vhost(name)
    # The broker answers Connection.Open for a vhost that is gone with Connection.Close.
    with pytest.raises(aiormq.exceptions.InvalidFrameError, match=r"Connection\.Close"):
        await aio_pika.connect(_url(user, password, name))
